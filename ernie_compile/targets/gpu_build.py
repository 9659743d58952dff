"""What the GPU targets share: TVM's GPU pipeline with a check in the middle.

The pipeline is TVM's own (library dispatch: GPU sort/top-k; legalize; fuse; dlight schedule rules;
lower), split after scheduling so the build can list every kernel and refuse unscheduled ones: on a
GPU an unscheduled kernel runs on one thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax, tirx

from ..errors import InternalError


@dataclass
class KernelReport:
    """Every device kernel of the library, and those without a thread binding."""

    kernels: list[str] = field(default_factory=list)
    unscheduled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"count": len(self.kernels), "unscheduled": len(self.unscheduled), "names": sorted(self.kernels)}


def _is_bound(func: tirx.PrimFunc) -> bool:
    """Whether any loop of `func` is bound to a GPU thread axis (the wheel has no Python TIR visitor:
    read the printed form)."""
    text = func.script()
    return "blockIdx." in text or "threadIdx." in text


@relax.expr_functor.mutator
class _SquareAsProduct(relax.PyExprMutator):
    """power(x, 2) → x · x. On an H200 the kernel TVM generates for RMSNorm's x² (`powf(x, 2.0f)`)
    returned NaN for finite input, so every CUDA artifact gave NaN logits (why it failed there is not
    established); WGSL's and Metal's pow are undefined for x < 0 in any case. x · x is exactly what
    a correct pow(x, 2) returns."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.power" and \
                isinstance(call.args[1], tvm.ir.expr.Constant) and call.args[1].value.numpy().size == 1 and \
                float(call.args[1].value.numpy()) == 2.0:
            return relax.op.multiply(call.args[0], call.args[0])
        return call


def square_as_product(mod: tvm.IRModule) -> tvm.IRModule:
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _SquareAsProduct(mod).visit_expr(func)
    return mod


def schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, KernelReport]:
    """Relax module → every PrimFunc legalized, fused and scheduled by dlight's GPU rules (GEMV for
    decode, Matmul for prefill, reductions, a fallback for the rest), plus the kernel report.
    Functions that arrive scheduled (ours, TVM's KV cache) are left as they are."""
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())

    # FuseTransposeMatmul: x @ permute_dims(W) as one matmul kernel reading W as stored; without it
    # every step would first copy each weight into a transposed temporary
    passes = [relax.transform.FuseTransposeMatmul(), *cuda_pipeline.library_dispatch_passes(target),
              relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
              dl.ApplyDefaultSchedule(*rules),
              relax.transform.DeadCodeElimination()]
    with target:
        mod = tvm.transform.Sequential(passes)(square_as_product(mod))
    report = KernelReport()
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            report.kernels.append(gv.name_hint)
            if not _is_bound(func):
                report.unscheduled.append(gv.name_hint)
    return mod, report


def lower_and_build(mod: tvm.IRModule, target: tvm.target.Target, report: KernelReport):
    """The scheduled module → a TVM executable (the rest of TVM's GPU pipeline)."""
    if report.unscheduled:
        raise InternalError(f"{len(report.unscheduled)} kernels left unscheduled: {report.unscheduled[:5]}")
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    rest = tvm.transform.Sequential([*cuda_pipeline.dataflow_lower_passes(target),
                                     *cuda_pipeline.finalize_passes(target)])

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m, _ctx):
        with target:
            return rest(m)

    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def device_source(module, kind: str) -> str:
    """The source of the one device module of `kind` ("cuda", "metal") under a built library."""
    found = [m for m in _walk(module) if m.kind == kind]
    if len(found) != 1:
        raise InternalError(f"expected one {kind} module in the build, found {len(found)}")
    return found[0].inspect_source()


def _walk(module):
    yield module
    for m in module.imports:
        yield from _walk(m)
