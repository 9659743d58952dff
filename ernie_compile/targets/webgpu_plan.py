"""Scheduled Relax module → a WebGPU launch plan + one WGSL module per kernel (docs/webgpu-artifact.md).

TVM builds the kernels (WebGPU codegen) and, for each PrimFunc, a host function that computes the
kernels' scalar arguments and grid sizes from buffer shapes. No host here can run those (they are
LLVM code for TVM's runtime), so this file reads them instead, after TVM's SplitHostDevice pass,
where each is still a readable list of `call_ffi_kernel(name, buffers…, scalars…, grid…)`
statements over the PrimFunc's shape variables. Walking each Relax step function binding by
binding then gives the flat launch list: shape variables become expressions of the dynamic length
T, every intermediate tensor gets a scratch buffer (reused once its last reader has run), reshapes
and in-place updates alias their input's buffer.

Integers: WGSL has no 64-bit integers, so every PrimFunc is narrowed to int32 first (TVM's
ForceNarrowIndexToInt32, which also narrows int64 buffers: every integer tensor is int32 on the
device, token ids and positions included).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from ..errors import InternalError
from ..runtime.webgpu_engine import evaluate  # the hosts' expression semantics

ALIGN = 256  # weight offsets in a shard: WebGPU's minStorageBufferOffsetAlignment
_OPS = {tirx.Add: "add", tirx.Sub: "sub", tirx.Mul: "mul", tirx.FloorDiv: "floordiv",
        tirx.FloorMod: "floormod", tirx.Min: "min", tirx.Max: "max",
        # truncating forms: the same on the non-negative sizes and indices a plan computes
        tirx.Div: "floordiv", tirx.Mod: "floormod"}
_CMP = {tirx.LT: "lt", tirx.LE: "le", tirx.GT: "gt", tirx.GE: "ge", tirx.EQ: "eq", tirx.NE: "ne"}
_WGSL_SCALAR = {"int32": "i32", "uint32": "u32", "float32": "f32"}


def _key(var) -> int:
    return var.__hash__()  # TVM objects hash by node identity; == on PrimExprs builds an expression


def to_expr(e, env: dict):
    """TIR integer expression → plan expression; `env` maps variables (by _key) to plan expressions."""
    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Cast):
        return to_expr(e.value, env)
    if isinstance(e, tvm.ir.expr.Var) or type(e).__name__ == "Var":
        if _key(e) not in env:
            raise InternalError(f"webgpu plan: unbound variable {e} in a launch expression")
        return env[_key(e)]
    if isinstance(e, tirx.Select) or (isinstance(e, tvm.ir.expr.Call) and getattr(e.op, "name", "") in ("prim.if_then_else", "tirx.if_then_else")):
        c, a, b = (e.condition, e.true_value, e.false_value) if isinstance(e, tirx.Select) else e.args
        c, a, b = to_expr(c, env), to_expr(a, env), to_expr(b, env)
        if isinstance(c, int):
            return a if c else b
        return ["select", c, a, b]
    op = _OPS.get(type(e)) or _CMP.get(type(e))
    if op is None:
        raise InternalError(f"webgpu plan: cannot express {type(e).__name__} ({e}) for a host")
    a, b = to_expr(e.a, env), to_expr(e.b, env)
    if isinstance(a, int) and isinstance(b, int):
        return evaluate([op, a, b], {})
    return [op, a, b]


@dataclass
class _Launch:
    kernel: str
    buffer_params: list[int]  # host-function parameter index bound at each buffer binding
    scalars: list  # TIR expressions over the host function's variables
    grid: list  # [x, y] TIR expressions


@dataclass
class _HostFunc:
    params: list  # buffer Vars (their types carry shapes)
    launches: list[_Launch] = field(default_factory=list)
    lets: dict = field(default_factory=dict)  # _key(var) → TIR expression (CSE'd subexpressions)


def _host_func(name: str, func) -> _HostFunc:
    """Read a host function after SplitHostDevice: buffer declarations, lets, kernel launches."""
    host = _HostFunc(list(func.params))
    decl: dict[int, int] = {_key(p): i for i, p in enumerate(func.params)}  # buffer var → param index

    def param_of(data_call) -> int:
        var = data_call.args[0]
        if _key(var) not in decl:
            raise InternalError(f"webgpu plan: {name}: a kernel reads a buffer that is not a parameter")
        return decl[_key(var)]

    def walk(stmt):
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                walk(s)
        elif isinstance(stmt, tirx.DeclBuffer):
            decl[_key(stmt.buffer)] = param_of(stmt.data)
        elif isinstance(stmt, tirx.Bind):
            host.lets[_key(stmt.var)] = stmt.value
        elif isinstance(stmt, tirx.AttrStmt):
            walk(stmt.body)
        elif isinstance(stmt, tirx.Evaluate) and getattr(stmt.value, "op", None) is not None \
                and stmt.value.op.name == "tirx.call_ffi_kernel":
            call = stmt.value
            tags = list(call.attrs.launch_params)
            args = list(call.args[1:])
            kernel_args, extents = args[:len(args) - len(tags)], args[len(args) - len(tags):]
            buffers = [param_of(a) for a in kernel_args if getattr(a, "op", None) is not None
                       and a.op.name == "tirx.buffer_data"]
            scalars = kernel_args[len(buffers):]
            grid = [1, 1]
            for tag, ext in zip(tags, extents):
                if tag == "blockIdx.z" or not tag.startswith(("blockIdx.", "threadIdx.")):
                    raise InternalError(f"webgpu plan: {name}: launch parameter {tag} is not supported")
                if tag.startswith("blockIdx."):
                    grid["xy".index(tag[-1])] = ext
            host.launches.append(_Launch(call.args[0].value, buffers, scalars, grid))
        else:
            raise InternalError(f"webgpu plan: {name}: host code other than kernel launches "
                                f"({type(stmt).__name__}) cannot run in a plan")

    walk(func.body)
    return host


def _split_sources(source: str) -> dict[str, str]:
    """TVM's WebGPU module source: '// Function: NAME' sections, one WGSL module per kernel."""
    parts = re.split(r"(?m)^// Function: (\S+)\n//-+\n", source)
    found: dict[str, str] = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        if len(text.strip()) > len(found.get(name, "")):
            found[name] = text.strip() + "\n"
    return found


def _kernel_info(name: str, device_func, wgsl: str) -> dict:
    """What a host needs to bind kernel `name`: buffer access per binding, scalar types, workgroup."""
    access = {int(i): a for i, a in re.findall(r"@binding\((\d+)\) var<storage, (read_write|read)>", wgsl)}
    n_buf = sum(1 for p in device_func.params if type(p.ty).__name__ == "PointerType")
    if sorted(access) != list(range(n_buf)):
        raise InternalError(f"webgpu plan: {name}: WGSL bindings {sorted(access)} do not match {n_buf} buffers")
    scalars = []
    for p in device_func.params[n_buf:]:
        dtype = str(p.ty.dtype)
        if dtype not in _WGSL_SCALAR:
            raise InternalError(f"webgpu plan: {name}: scalar argument of type {dtype}")
        scalars.append(_WGSL_SCALAR[dtype])
    wg = re.search(r"@workgroup_size\((\d+), (\d+), (\d+)\)", wgsl)
    shared = sum(_wgsl_bytes(t, int(n)) for t, n in re.findall(r"var<workgroup> \w+ : array<(\w+), (\d+)>", wgsl))
    return {"buffers": [access[i] for i in range(n_buf)], "scalars": scalars,
            "workgroup_size": [int(g) for g in wg.groups()] if wg else [1, 1, 1], "workgroup_bytes": shared}


def _wgsl_bytes(t: str, n: int) -> int:
    return n * (2 if t == "f16" else 4)


def compile_kernels(mod: tvm.IRModule, target) -> tuple[dict[str, _HostFunc], dict[str, dict], dict[str, str]]:
    """Every PrimFunc of `mod`, narrowed to int32 and built for WebGPU → (host function of each
    PrimFunc by name, kernel info by kernel name, WGSL by kernel name)."""
    prims = {gv.name_hint: f.with_attr("global_symbol", gv.name_hint)
             for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    # Lower cross-thread reductions first (the pass rejects the loop nests narrowing leaves), then
    # simplify (a slice to the end may leave min(T, INT64_MAX), which no int32 holds), then narrow.
    tir = tvm.transform.Sequential([
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerCrossThreadReduction(),
        tirx.transform.StmtSimplify(), tirx.transform.ForceNarrowIndexToInt32(),
    ])(tvm.IRModule({tvm.ir.GlobalVar(n): f for n, f in prims.items()}))
    split = {}

    @tvm.instrument.pass_instrument
    class _AfterSplit:
        def run_after_pass(self, m, info):
            if info.name == "tirx.SplitHostDevice":
                split["mod"] = m

    with tvm.transform.PassContext(instruments=[_AfterSplit()]):
        lib = tvm.tirx.build(tir, target=target)
    webgpu = [m for m in lib.imports if m.kind == "webgpu"]
    if len(webgpu) != 1:
        raise InternalError(f"webgpu plan: expected one webgpu module, found {[m.kind for m in lib.imports]}")
    sources = _split_sources(webgpu[0].inspect_source())
    hosts, kernels = {}, {}
    for gv, f in split["mod"].functions_items():
        if "calling_conv" in f.attrs and int(f.attrs["calling_conv"]) == 2:
            if gv.name_hint not in sources:
                raise InternalError(f"webgpu plan: no WGSL for kernel {gv.name_hint}")
            kernels[gv.name_hint] = _kernel_info(gv.name_hint, f, sources[gv.name_hint])
        else:
            hosts[gv.name_hint] = _host_func(gv.name_hint, f)
    return hosts, kernels, {k: sources[k] for k in kernels}


def _dtype_bytes(dtype: str) -> int:
    if dtype in ("int64", "uint64"):  # narrowed: int32 on the device
        return 4
    if dtype == "bool":
        return 4
    return max(1, tvm.DataType(dtype).bits // 8)


class _Planner:
    """Walks Relax step functions, assigning buffers and emitting launches."""

    def __init__(self, hosts, kernels, var_ranges: dict[str, tuple[int, int]]):
        self.hosts, self.kernels = hosts, kernels
        self.var_max = {v: hi for v, (lo, hi) in var_ranges.items()}
        self.buffers: list[dict] = []
        self.named: dict[str, int] = {}  # input / kv / weight buffers, shared by the functions
        self.constants: list[np.ndarray] = []
        self.scratch: list[int] = []  # buffer ids of scratch slots, shared by the functions

    def shared_buffer(self, name: str, kind: str, nbytes: int, **extra) -> int:
        if name not in self.named:
            self.named[name] = len(self.buffers)
            self.buffers.append({"kind": kind, "bytes": nbytes, "name": name, **extra})
        buf = self.buffers[self.named[name]]
        buf["bytes"] = max(buf["bytes"], nbytes)
        return self.named[name]

    def function(self, func: relax.Function, num_inputs: int) -> dict:
        sym: dict[int, object] = {}  # relax shape variable → plan expression
        values: dict[int, int] = {}  # relax var → buffer id (tensors) or list of ids (tuples)
        launches = []

        def shape_expr(shape):
            out = []
            for d in shape:
                if isinstance(d, tirx.Var) or type(d).__name__ == "Var":
                    if _key(d) not in sym:
                        sym[_key(d)] = "T"  # the one dynamic length a step has
                out.append(to_expr(d, sym))
            return out

        def nbytes(ty) -> object:
            expr = _dtype_bytes(ty.dtype)
            for d in shape_expr(ty.shape):
                expr = expr * d if isinstance(expr, int) and isinstance(d, int) else ["mul", expr, d]
            return expr

        def max_bytes(ty) -> int:
            return evaluate(nbytes(ty), self.var_max)

        for i, p in enumerate(func.params):
            name = p.name
            if i < num_inputs:
                kind = "kv" if "cache" in name else "input"
                extra = {"dtype": "int32"} if kind == "input" else {}
                values[_key(p)] = self.shared_buffer(name, kind, max_bytes(p.ty), **extra)
            else:
                # named by the packaging step (the weight file's order); the plan knows positions
                values[_key(p)] = self.shared_buffer(f"param_{i - num_inputs}", "weight", max_bytes(p.ty),
                                                     param=i - num_inputs)
        inputs = {p.name: values[_key(p)] for p in func.params[:num_inputs] if "cache" not in p.name}

        bindings = [b for block in func.body.blocks for b in block.bindings]
        last_use: dict[int, int] = {}
        root: dict[int, int] = {}  # var → the var whose buffer it aliases
        for i, b in enumerate(bindings):
            for v in relax.analysis.free_vars(b.value):
                last_use[root.get(_key(v), _key(v))] = i
            src = b.value.tuple_value if isinstance(b.value, relax.TupleGetItem) else _aliases(b.value)
            if src is not None:  # a view or a tuple item lives as long as what it reads
                root[_key(b.var)] = root.get(_key(src), _key(src))
        result = func.body.body
        for v in relax.analysis.free_vars(result):
            last_use[root.get(_key(v), _key(v))] = len(bindings)

        dies_at: dict[int, list[int]] = {}  # binding index → root vars last read there
        for r, last in last_use.items():
            dies_at.setdefault(last, []).append(r)
        free: list[int] = []  # free scratch slots (indices into self.scratch)
        slot_of: dict[int, int] = {}  # buffer id → slot
        owner: dict[int, int] = {}  # root var → buffer id it owns

        def scratch(size: int) -> int:
            fits = sorted((s for s in free if self.buffers[self.scratch[s]]["bytes"] >= size),
                          key=lambda s: self.buffers[self.scratch[s]]["bytes"])
            if fits:
                slot = fits[0]
            elif free:
                slot = max(free, key=lambda s: self.buffers[self.scratch[s]]["bytes"])
            else:
                self.scratch.append(len(self.buffers))
                self.buffers.append({"kind": "scratch", "bytes": 0})
                slot = len(self.scratch) - 1
            if slot in free:
                free.remove(slot)
            buf = self.scratch[slot]
            self.buffers[buf]["bytes"] = max(self.buffers[buf]["bytes"], size)
            slot_of[buf] = slot
            return buf

        def arg_buffer(a) -> int:
            if isinstance(a, tvm.ir.expr.Constant):
                self.constants.append(a.value.numpy())
                return self.shared_buffer(f"constant_{len(self.constants) - 1}", "weight", a.value.numpy().nbytes,
                                          constant=len(self.constants) - 1)
            if type(a.ty).__name__ == "PrimType":  # a scalar (a symbolic length) passed to the kernel
                return ("value", to_expr(a, sym))
            if _key(a) not in values:
                raise InternalError(f"webgpu plan: {func.attrs['global_symbol']}: {a} has no buffer")
            return values[_key(a)]

        for i, b in enumerate(bindings):
            value, var = b.value, b.var
            src = _aliases(value)
            if src is not None:
                values[_key(var)] = values[_key(src)]
            elif isinstance(value, relax.TupleGetItem):
                values[_key(var)] = values[_key(value.tuple_value)][value.index]
            elif isinstance(value, relax.Call) and value.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
                gv, args = value.args[0], [arg_buffer(a) for a in value.args[1].fields]
                if len(value.args) > 2:
                    raise InternalError(f"webgpu plan: {gv.name_hint}: call_tir with tir_vars")
                out_types = list(value.ty.fields) if isinstance(value.ty, relax.TupleType) else [value.ty]
                inplace = list(value.attrs.inplace_indices) if value.op.name.endswith("inplace") else [-1] * len(out_types)
                outs = [args[j] if j >= 0 else scratch(max_bytes(t)) for j, t in zip(inplace, out_types)]
                launches += self.call(gv.name_hint, args + [o for j, o in zip(inplace, outs) if j < 0],
                                      [a.ty for a in value.args[1].fields] + [t for j, t in zip(inplace, out_types) if j < 0],
                                      shape_expr)
                values[_key(var)] = outs if isinstance(value.ty, relax.TupleType) else outs[0]
                owner[_key(var)] = values[_key(var)]
            else:
                raise InternalError(f"webgpu plan: {func.attrs['global_symbol']}: cannot plan `{value}`")
            # free the scratch of values whose last reader was this binding
            for r in dies_at.get(i, ()):
                if r in owner:
                    for buf in (owner[r] if isinstance(owner[r], list) else [owner[r]]):
                        if buf in slot_of:
                            free.append(slot_of.pop(buf))
        out = values[_key(result)]
        return {"inputs": inputs, "output": {"buffer": out, "dtype": str(result.ty.dtype),
                                             "count": _count(shape_expr(result.ty.shape))},
                "launches": launches}

    def call(self, prim: str, buffers: list[int], types: list, shape_expr) -> list[dict]:
        host = self.hosts[prim]
        if len(host.params) != len(buffers):
            raise InternalError(f"webgpu plan: {prim} takes {len(host.params)} buffers, given {len(buffers)}")
        env: dict[int, object] = {}
        for p, ty, arg in zip(host.params, types, buffers):
            if isinstance(arg, tuple):  # a scalar parameter
                env[_key(p)] = arg[1]
                continue
            for d, rd in zip(p.ty.shape, shape_expr(ty.shape)):
                if (isinstance(d, tirx.Var) or type(d).__name__ == "Var") and _key(d) not in env:
                    env[_key(d)] = rd
        for k, e in host.lets.items():
            env[k] = to_expr(e, env)
        out = []
        for launch in host.launches:
            out.append({"kernel": launch.kernel, "buffers": [buffers[j] for j in launch.buffer_params],
                        "scalars": [to_expr(s, env) for s in launch.scalars],
                        "grid": [to_expr(g, env) for g in launch.grid]})
        return out


def _count(shape: list):
    n = 1
    for d in shape:
        n = n * d if isinstance(n, int) and isinstance(d, int) else ["mul", n, d]
    return n


def _aliases(value):
    """The variable whose buffer `value` reuses: a plain alias or a reshape (a view)."""
    if isinstance(value, relax.Var):
        return value
    if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.reshape":
        return value.args[0]
    return None


def build(mod: tvm.IRModule, target, var_ranges: dict[str, tuple[int, int]],
          max_seq_len: int) -> tuple[dict, dict[str, str], list[np.ndarray]]:
    """→ (plan without weight placement, WGSL by kernel, constants the plan reads as weights)."""
    mod = relax.transform.RewriteDataflowReshape()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    hosts, kernels, sources = compile_kernels(mod, target)
    planner = _Planner(hosts, kernels, var_ranges)
    functions = {}
    for name in ("prefill", "decode"):
        f = mod[name]
        functions[name] = planner.function(f, int(f.attrs["num_input"]))
    used = {launch["kernel"] for f in functions.values() for launch in f["launches"]}
    # file names: fused kernels' names can pass the file system's 255-byte limit
    kernels = {k: dict(v, wgsl=f"kernels/{i:03d}-{k[:80]}.wgsl")
               for i, (k, v) in enumerate(sorted(kernels.items())) if k in used}
    limits = {
        "maxStorageBufferBindingSize": max(b["bytes"] for b in planner.buffers),
        "maxStorageBuffersPerShaderStage": max(len(k["buffers"]) for k in kernels.values()),
        "maxComputeWorkgroupStorageSize": max(k.pop("workgroup_bytes") for k in kernels.values()),
        "maxComputeInvocationsPerWorkgroup": max(math.prod(k["workgroup_size"]) for k in kernels.values()),
    }
    plan = {"format": "ernie-webgpu-plan", "version": 1, "max_seq_len": max_seq_len,
            "vars": {k: list(v) for k, v in var_ranges.items()}, "limits": limits,
            "buffers": planner.buffers, "kernels": kernels, "functions": functions}
    return plan, {k: sources[k] for k in kernels}, planner.constants
