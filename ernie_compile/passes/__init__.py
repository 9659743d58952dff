"""Graph passes. One pass per file; each counts the sites it matched (see PassReport)."""
from dataclasses import dataclass


@dataclass
class PassReport:
    """What one pass matched against what the model says it should match."""

    name: str
    matched: int = 0
    expected: int = 0

    def check(self) -> None:
        from ..errors import InternalError

        if self.expected and self.matched != self.expected:
            raise InternalError(f"pass {self.name} matched {self.matched} of {self.expected} expected sites")

    def __str__(self) -> str:
        return f"{self.name}: {self.matched}/{self.expected}"


@dataclass
class LinearRead:
    """How a matmul reads its weight: x @ outer(permute_dims(inner(W))), where the importer may add
    either cast (`inner`, `outer`: the astype calls, or None) around a float16 linear."""

    weight: object  # the weight Var W
    inner: object
    outer: object


def producer(mutator, expr, op_name: str):
    """The call of `op_name` that produced `expr` (through its binding in `mutator`), or None."""
    import tvm
    from tvm import relax

    bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
    if isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == op_name:
        return bound
    return None


def leading_rows(x) -> tuple[list, object]:
    """x's leading dims (all but the last) and their product: the M of the [M, C] a kernel over
    rows sees, x being reshaped to it and the kernel's output back to [*lead, N]."""
    lead = [x.ty.shape[i] for i in range(len(x.ty.shape) - 1)]
    m = 1
    for d in lead:
        m = m * d
    return lead, m


def linear_read(mutator, call) -> LinearRead | None:
    """For R.matmul(x, wt): how wt reads a weight, or None if it is not a transposed weight."""
    outer = producer(mutator, call.args[1], "relax.astype")
    perm = producer(mutator, outer.args[0] if outer is not None else call.args[1], "relax.permute_dims")
    if perm is None:
        return None
    inner = producer(mutator, perm.args[0], "relax.astype")
    return LinearRead(inner.args[0] if inner is not None else perm.args[0], inner, outer)


# compiler/capture.py; `batch` only where captured; `prefill_mm` (a prompt holding images) and
# `encode_image` (the vision tower and resampler) only for the VL model
STEP_FUNCTIONS = ("encode_image", "prefill_mm", "prefill", "batch", "decode")
TEXT_FUNCTIONS = ("prefill_mm", "prefill", "batch", "decode")  # where a pass applies unless it says (FUNCTIONS)


def applies_to(p, function: str) -> bool:
    """Whether graph pass `p` must match its sites in step function `function`."""
    return function in getattr(p, "FUNCTIONS", TEXT_FUNCTIONS)


def swap_each(modules, make_forward, report: PassReport) -> PassReport:
    """Give each of `modules` the forward make_forward(module) returns (on these module instances:
    transformers' classes are untouched), counting each in `report`."""
    for module in modules:
        module.forward = make_forward(module)
        report.matched += 1
    return report


def swap_forwards(model, cls, make_forward, report: PassReport) -> PassReport:
    """swap_each over every module of `model` that is a `cls`."""
    return swap_each((m for m in model.modules() if isinstance(m, cls)), make_forward, report)


def text_decoder(model):
    """The decoder of a text model (Ernie4_5ForCausalLM, …: its `model`) or the VL model's language model."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def decoder_layers(model):
    """The decoder layers of a text model or of the VL model's language model."""
    return text_decoder(model).layers


def step_functions(mod) -> tuple[str, ...]:
    """The step functions `mod` holds: the passes rewrite each of them alike."""
    names = {gv.name_hint for gv in mod.get_global_vars()}
    return tuple(f for f in STEP_FUNCTIONS if f in names)


def rewrite_weight_inputs(mod, weights: list, functions, pass_name: str, what: str, replace, rewriter):
    """The driver of a pass that replaces some weight inputs of each step function by new ones.

    replace(var, w) → None (keep input `var`, WeightRecord `w`), or (value, new input vars, their
    WeightRecords), `value` being what `rewriter(mod, {var: value, …})` — a PyExprMutator that
    counts the readers it rewrote in `.sites` — gets to rewrite the readers of `var` with. Returns
    the module, the new weight records (every step function must agree on them) and the sites of
    the last function. An InternalError if a replaced input is still read (`what` names them)."""
    import tvm
    from tvm import relax

    from ..errors import InternalError

    mod = tvm.IRModule(dict(mod.functions_items()))
    new_weights, sites = None, 0
    for fname in functions or step_functions(mod):
        func = mod[fname]
        n_in = int(func.attrs["num_input"])
        params, records, replaced = list(func.params[:n_in]), [], {}
        for var, w in zip(func.params[n_in:], weights):
            out = replace(var, w)
            if out is None:
                params.append(var)
                records.append(w)
                continue
            replaced[var], new_params, new_records = out
            params.extend(new_params)
            records.extend(new_records)
        mutator = rewriter(mod, replaced)
        new = relax.analysis.remove_all_unused(relax.Function(params, mutator.visit_expr(func.body), func.ret_ty,
                                                              func.is_pure, func.attrs))
        still = {str(v) for v in relax.analysis.free_vars(new.body)} & {str(v) for v in replaced}
        if still:
            raise InternalError(f"{pass_name}: {func.attrs['global_symbol']} still reads {what} {sorted(still)[:3]}")
        mod[fname] = new
        if new_weights is not None and new_weights != records:
            raise InternalError(f"{pass_name}: step functions disagree on the weight list")
        new_weights, sites = records, mutator.sites
    return mod, new_weights, sites


def select_passes(config, fuse_attention: bool = True) -> list:
    """The passes that apply to `config`, in order. Each pass module has NAME, OP_NAME,
    expected_sites(config), install(model) (capture side: route transformers' modules through our
    op) and converter(report, ctx) (lower side: our op → Relax). Attention takes exactly one of two
    routes: fused (default), or the plain route kept as the unfused baseline for benchmarks."""
    from . import (fuse_gated_mlp, fuse_gqa_attention, fuse_modality_moe, fuse_moe_routing, fuse_rms_norm,
                   merge_still_frames, place_image_features, route_attention_to_kv_cache, route_vision_attention)

    if config.model_type == "ernie4_5_vl_moe":
        # M-RoPE rotates by three position axes the paged cache does not track: RoPE stays in the graph
        attention = route_attention_to_kv_cache
    else:
        attention = fuse_gqa_attention if fuse_attention else route_attention_to_kv_cache
    return [p for p in (attention, fuse_moe_routing, fuse_modality_moe, fuse_gated_mlp, fuse_rms_norm,
                        route_vision_attention, merge_still_frames, place_image_features) if p.expected_sites(config)]
