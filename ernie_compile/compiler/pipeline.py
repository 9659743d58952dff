"""The one place that decides stage order: each backend is a list of named phases, run by one loop.

`compile_model` first checks the flags and output paths, resolves the options against the target,
and reads and validates the model's config (validate.py; cheap checks: nothing is loaded for a bad
flag or config), then runs the backend's phases in order inside the staging folder (package.staging:
the artifact appears at -o whole or not at all). The loop times each phase, collects what each
pass matched against what it expected (a shortfall fails the compile), writes the IR after every
phase with `--dump-ir DIR` (`NN-phase.*`), and on an internal error names the phase and the
phases before it.

TVM route (the default backend):
    load                 checkpoint folder / preset → transformers' own model (load.py)
    capture              the graph passes route transformers' modules through our ops
                         (fuse_gqa_attention, fuse_moe_routing, fuse_gated_mlp, fuse_rms_norm);
                         torch.export of prefill, decode and (targets with batch_step) batch
                         (capture.py)
    lower                ExportedPrograms → Relax; each graph pass's converter lowers its op
                         (lower.py, passes/); weight records for the packager
    split_large_weights  weights over the target's binding limit → row blocks (WebGPU)
    quantize_weights     --bits: packed weights, dequantizing kernels
    target_passes        the target's own Relax passes (CPU: linears onto our kernels)
    build                Relax → the target's library and files (targets/)
    package              weights (streamed record by record), tokenizer, manifest with hashes
    accuracy             --bits: KL / top-1 of the artifact against the float model
Inductor route (`--backend inductor`, compiler/inductor.py): load, capture, build, package.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import InternalError, UserError
from ..passes import PassReport, quantize_weights, select_passes, split_large_weights
from ..quant import QuantPolicy
from ..targets import Target, get_target
from . import package, validate
from .kernel_count import count_kernels
from .lower import PAGE_SIZE
from .options import CompileOptions

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_TUNING_DB = Path.home() / ".cache" / "ernie-compile" / "tuning-db.jsonl"
ACCURACY_MODEL_BYTES = 2 << 30  # largest float32 reference model the accuracy report builds in memory


@dataclass
class Compile:
    """What the phases read and write, in the order they fill it in."""

    opts: CompileOptions
    log: Callable
    out: Path | None = None  # the staging folder (becomes -o)
    target: Target | None = None  # tvm route
    policy: QuantPolicy | None = None
    tuner: object = None
    loaded: object = None  # load.LoadedModel
    passes: list = field(default_factory=list)  # graph passes (passes.select_passes)
    captured: object = None
    mod: object = None  # the Relax IRModule
    weights: list = field(default_factory=list)  # WeightRecords, in the step functions' input order
    reports: list[PassReport] = field(default_factory=list)
    decode_kernels: dict | None = None
    built: object = None
    manifest: dict | None = None
    recon_errors: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    plan: dict | None = None


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[Compile], None]
    applies: Callable[[Compile], bool] = lambda c: True
    dump: Callable[[Compile, Path], None] | None = None  # writes this phase's IR under the given stem


# Warnings of our dependencies about their own internals, printed on every compile and telling a user
# nothing to act on: (category, message regex, why it is not ours to fix).
KNOWN_WARNINGS = [
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch.export copies its own LeafSpec tree specs (torch 2.10+ deprecates the class it still uses)"),
]


def _run_phases(phases: list[Phase], c: Compile, dump_dir: Path | None) -> None:
    with warnings.catch_warnings():
        for category, message, _ in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        _run_phases_loop(phases, c, dump_dir)


def _run_phases_loop(phases: list[Phase], c: Compile, dump_dir: Path | None) -> None:
    done: list[str] = []
    for i, phase in enumerate(phases):
        if not phase.applies(c):
            continue
        c.log(f"[{phase.name}] …")
        t = time.perf_counter()
        try:
            phase.run(c)
        except InternalError as e:
            raise InternalError(f"phase {phase.name} (after {', '.join(done) or 'none'}): {e}") from e
        c.seconds[phase.name] = round(time.perf_counter() - t, 3)
        c.log(f"[{phase.name}] {c.seconds[phase.name]:.2f} s")
        done.append(phase.name)
        if dump_dir and phase.dump:
            phase.dump(c, dump_dir / f"{i:02d}-{phase.name}")


# ---------------------------------------------------------------------------------------------
# Dumps: the IR each phase leaves behind


def _dump_graphs(c: Compile, stem: Path) -> None:
    for name in ("prefill", "decode", "batch"):
        if getattr(c.captured, name) is None:
            continue
        Path(f"{stem}.{name}.txt").write_text(str(getattr(c.captured, name).graph_module.code))


def _dump_relax(c: Compile, stem: Path) -> None:
    Path(f"{stem}.relax.py").write_text(c.mod.script(show_meta=False))


def _dump_weights(c: Compile, stem: Path) -> None:
    rows = [{"name": r.name, "sources": list(r.sources), "shape": list(r.shape), "dtype": r.dtype,
             "rows": r.rows, "quant": r.quant.as_dict() if r.quant else None} for r in c.weights]
    Path(f"{stem}.weights.json").write_text(json.dumps(rows, indent=1) + "\n")


def _dump_relax_and_weights(c: Compile, stem: Path) -> None:
    _dump_relax(c, stem)
    _dump_weights(c, stem)


def _dump_build(c: Compile, stem: Path) -> None:
    Path(f"{stem}.json").write_text(json.dumps({"library": c.built.library.name, **c.built.info}, indent=1) + "\n")


def _dump_manifest(c: Compile, stem: Path) -> None:
    Path(f"{stem}.manifest.json").write_text(json.dumps(c.manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Phases shared by both routes


def _load(c: Compile, materialize: bool) -> None:
    """The model as transformers builds it; weightless for the TVM route, which reads every weight
    from the checkpoint (or the preset's generator) only while it writes the artifact."""
    from .load import load

    opts = c.opts
    c.loaded = load(opts.model, opts.seed, dict(opts.preset_overrides), materialize=materialize)
    skipped = c.loaded.weights.skipped if c.loaded.weights is not None else []
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        c.log(f"  skipped {len(skipped)} checkpoint tensors transformers does not use: {shown}")
    c.log("options: " + json.dumps(c.opts.as_dict()))


def _check_config(c: Compile) -> None:
    """The model's config, read and validated before anything is loaded (compiler/validate.py), and
    --max-seq-len resolved against it."""
    from .load import read_config

    config = read_config(c.opts.model, dict(c.opts.preset_overrides))
    if c.opts.max_seq_len is None:
        c.opts = dataclasses.replace(c.opts, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, config.get_text_config().max_position_embeddings))
    validate.max_seq_len(c.opts.max_seq_len, config)
    if config.model_type == "ernie4_5_vl_moe":
        if c.opts.backend != "tvm":
            raise UserError(f"--backend {c.opts.backend}: the VL model compiles on the tvm backend only")
        if c.target.kv_cache == "contiguous":
            raise UserError(f"target {c.target.name}: the VL model's 3-D RoPE attention needs the paged KV cache, "
                            f"which {c.target.name} does not have (its attention kernels take 1-D positions)")


def _versions() -> dict:
    import torch
    import transformers
    import tvm

    return {"ernie_compile": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tvm": tvm.__version__}


def _manifest(c: Compile, backend: str) -> dict:
    """The manifest fields every backend writes; each adds its own entry points and files."""
    config = c.loaded.model.config.get_text_config()  # the VL model's tokens are its text model's
    eos = config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    tokenizer = {"files": package.copy_tokenizer(c.loaded.tokenizer_files, c.out),
                 "bos_token_id": config.bos_token_id, "eos_token_ids": eos}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "model": {"source": c.loaded.source, "model_type": c.loaded.model.config.model_type,
                  "num_parameters": sum(p.numel() for p in c.loaded.model.parameters()),
                  "config": json.loads(c.loaded.model.config.to_json_string(use_diff=False))},
        "options": c.opts.as_dict(),
        "versions": _versions(),
        "dtype": c.opts.dtype,
        "vocab_size": config.vocab_size,
        "tokenizer": tokenizer,
    }


# ---------------------------------------------------------------------------------------------
# The TVM route


def _act_bits(opts: CompileOptions, target: Target) -> str:
    """--act-bits resolved: "8" or "none" (recorded in the manifest's options). "8" quantizes the
    activations of the weights the target's int8 dot takes (Target.int8_weight_bits); the others
    keep float activations."""
    if opts.act_bits not in ("auto", "8", "none"):
        raise UserError(f"--act-bits {opts.act_bits}: auto, 8 or none")
    if opts.bits is None and opts.embed_bits is None:
        return "none"  # float weights: activations stay float too
    if opts.act_bits == "8" and not target.int8_dot:
        raise UserError(f"--act-bits 8: target {target.spec} has no int8 dot product (AVX-512 VNNI or AVX2); "
                        "use --act-bits none")
    if opts.act_bits == "auto":
        return "8" if target.int8_dot else "none"
    return opts.act_bits


def _tuner(opts: CompileOptions, log):
    from .tuning import Tuner, TuningDB

    if opts.tuning_db is None:
        return Tuner()
    db = TuningDB.open(opts.tuning_db)
    if opts.tune:
        log(f"tuning: measuring missing schedule candidates on this machine into {db.path}")
    return Tuner(db, search=opts.tune, max_trials=opts.tune_trials, log=log,
                 max_seconds=opts.tune_minutes * 60 if opts.tune_minutes else None)


def _resolve_tvm(c: Compile) -> None:
    opts = c.opts
    target = c.target = get_target(opts.target)
    opts = dataclasses.replace(opts, act_bits=_act_bits(opts, target))
    if target.kv_cache == "contiguous" and not opts.fuse_attention:
        raise UserError(f"--no-fuse-attention: target {target.name} attends through its own KV-cache kernels, "
                        "which the fused attention route feeds")
    dtype = opts.dtype or target.dtypes[0]
    if dtype not in target.dtypes:
        raise UserError(f"--dtype {dtype}: target {target.name} computes in {' or '.join(target.dtypes)}")
    opts = dataclasses.replace(opts, dtype=dtype, scale_dtype=opts.scale_dtype or target.scale_dtypes[dtype])
    c.policy = QuantPolicy.parse(opts.bits, opts.embed_bits, opts.group_size, opts.symmetric, opts.scale_dtype,
                                 8 if opts.act_bits == "8" else None)
    if opts.tune and opts.tuning_db is None:
        opts = dataclasses.replace(opts, tuning_db=DEFAULT_TUNING_DB)
    if opts.tune and not target.tunable:
        raise UserError(f"--tune: target {target.name} has no kernels with schedule parameters to search")
    if opts.tune and not target.runs_here():
        raise UserError(f"--tune measures kernels on this machine; a {target.spec} build does not run here "
                        f"(tune on the device, then pass --tuning-db)")
    c.opts = opts
    c.tuner = _tuner(opts, c.log)


def _capture(c: Compile) -> None:
    from .capture import capture
    from .load import cast
    from .weights import fake_parameters

    model = c.loaded.model
    cast(model, c.opts.dtype)
    c.passes = select_passes(model.config, fuse_attention=c.opts.fuse_attention)
    with fake_parameters(model):  # shapes and dtypes only: no weight is held
        c.captured = capture(model, c.opts.max_seq_len, c.passes, ids_dtype=c.target.index_dtype,
                             batch=c.target.batch_step)


def _lower(c: Compile) -> None:
    from .lower import lower

    c.mod, reports, c.weights = lower(c.captured, c.loaded.model.config, c.target, c.passes, c.opts.dtype,
                                      c.opts.max_seq_len)
    c.reports += reports


def _split(c: Compile) -> None:
    c.mod, c.weights, report = split_large_weights.run(c.mod, c.weights, c.target.max_binding_bytes, c.policy,
                                                       c.target.quant_layouts)
    c.reports.append(report)


def _quantize(c: Compile) -> None:
    config = c.loaded.model.config
    text = getattr(config, "text_config", config)  # the VL model's text half holds its experts
    c.mod, c.weights, report = quantize_weights.run(c.mod, c.weights, c.policy, c.target, tuner=c.tuner,
                                                    top_k=getattr(text, "moe_k", None) or 1)
    c.reports.append(report)


def _target_passes(c: Compile) -> None:
    from ..passes import clip_take_indices

    c.mod, reports = c.target.passes(c.mod, c.tuner)
    c.reports += reports
    c.mod, _ = clip_take_indices.run(c.mod)  # last: after every pass that emits a take
    c.decode_kernels = count_kernels(c.mod, "decode")
    c.log(f"  decode step: {c.decode_kernels['tir']} TIR kernels, {c.decode_kernels['builtin']} runtime builtin calls")
    if c.opts.tuning_db:
        c.log(f"  tuning: {c.tuner.stats}")
    for r in c.reports:
        c.log(f"  pass {r}")


def _build(c: Compile) -> None:
    c.built = c.target.build(c.mod, c.out, c.opts.max_seq_len)
    if "launches" in c.built.info:  # a launch plan: what a host dispatches per call
        c.log("  launch plan: " + ", ".join(f"{f} {n} kernels" for f, n in c.built.info["launches"].items()))


def _package(c: Compile) -> None:
    target = c.target
    manifest = _manifest(c, target.backend)
    stored, c.recon_errors = target.write_weights(c.out, c.weights, c.loaded.weights, c.built, c.log)
    target.write_host_files(c.out, manifest["tokenizer"])
    c.manifest = dict(
        manifest,
        target={"spec": target.spec, "device": target.device, "tvm": str(target.tvm), "cross": target.cross},
        library=c.built.library.name,
        kernels=c.built.info,
        functions={"create_kv": "create_kv", **{name: name for name in c.captured.programs()}},
        vision=_vision(c),
        weights={**stored,
                 "fused": {r.weight: list(r.sources) for r in c.weights if len(r.sources) > 1},
                 "quantized": {r.name: r.quant.as_dict() for r in c.weights if r.quant}},
        quantization=_quantization(c),
        kv_cache={"max_seq_len": c.opts.max_seq_len, "page_size": PAGE_SIZE},
        passes={r.name: {"matched": r.matched, "expected": r.expected} for r in c.reports},
        tuning=c.tuner.report() if c.opts.tuning_db else None)
    package.write_manifest(c.out, c.manifest)


def _vision(c: Compile) -> dict | None:
    """The VL model's image settings for the runtime (runtime/vision.py): the checkpoint's processor
    config (or transformers' defaults for a preset) and the model's image tokens; None for text models."""
    from ..runtime.vision import VisionSpec

    config = c.loaded.model.config
    if config.model_type != "ernie4_5_vl_moe":
        return None
    folder = Path(c.loaded.source) if Path(c.loaded.source).is_dir() else None
    return VisionSpec.from_checkpoint(folder, config.to_dict()).to_json()


def _quantization(c: Compile) -> dict | None:
    """The manifest's "quantization": the policy, and the int8 dot its vnni16 kernels were built with
    (None without any): the runtime refuses the artifact on a CPU without that instruction."""
    if not c.policy:
        return None
    int8 = any(r.quant and r.quant.layout == "vnni16" for r in c.weights)
    return {**c.policy.as_dict(), "int8_dot": c.target.int8_dot if int8 else None}


def _accuracy(c: Compile) -> None:
    """Quantized vs float: KL and top-1 on a fixed prompt set (compiler/accuracy.py), against the
    float32 model built afresh from the same weights where it fits ACCURACY_MODEL_BYTES, per-weight
    error always."""
    from .accuracy import measure
    from .load import load

    acc = {"weight_rel_error": c.recon_errors}
    config = c.loaded.model.config
    float_bytes = 4 * sum(p.numel() for p in c.loaded.model.parameters())
    if not c.target.runs_here():
        acc["note"] = f"KL / top-1 not measured: a {c.target.spec} artifact does not run on this machine"
    elif float_bytes > ACCURACY_MODEL_BYTES:
        acc["note"] = (f"KL / top-1 not measured: the float32 reference model ({float_bytes / 2**30:.1f} GiB) "
                       f"exceeds the {ACCURACY_MODEL_BYTES >> 30} GiB a compile may hold; weight errors only")
    else:  # built anew: the captured model's modules were rerouted through our ops
        reference = load(c.opts.model, c.opts.seed, dict(c.opts.preset_overrides), materialize=True)
        acc.update(measure(reference.model, c.out, config.get_text_config().vocab_size))
        del reference
    c.manifest["accuracy"] = acc
    package.write_manifest(c.out, c.manifest)
    errs = acc["weight_rel_error"]
    worst = max(errs, key=errs.get) if errs else None
    line = f"  accuracy vs float: weight error mean {np.mean(list(errs.values())):.4f}"
    if worst:
        line += f", worst {errs[worst]:.4f} ({worst})"
    if "kl_mean" in acc:
        line += (f"; KL mean {acc['kl_mean']:.5f} max {acc['kl_max']:.5f}, "
                 f"top-1 agreement {100 * acc['top1_agreement']:.1f}%")
    c.log(line)


def _writes(c: Compile) -> bool:
    return not c.opts.plan


def _plan(c: Compile) -> None:
    from .plan import plan

    c.plan = plan(c.weights, c.loaded.model.config, c.target, c.opts)
    for line in c.plan["lines"]:
        c.log(line)


TVM_PHASES = [
    Phase("load", lambda c: _load(c, materialize=False)),
    Phase("capture", _capture, dump=_dump_graphs),
    Phase("lower", _lower, dump=_dump_relax_and_weights),
    Phase("split_large_weights", _split, applies=lambda c: c.target.max_binding_bytes is not None,
          dump=_dump_relax_and_weights),
    Phase("quantize_weights", _quantize, applies=lambda c: c.policy is not None, dump=_dump_relax_and_weights),
    Phase("plan", _plan, applies=lambda c: c.opts.plan),  # --plan stops here: nothing is built or written
    Phase("target_passes", _target_passes, applies=_writes, dump=_dump_relax),
    Phase("build", _build, applies=_writes, dump=_dump_build),
    Phase("package", _package, applies=_writes, dump=_dump_manifest),
    Phase("accuracy", _accuracy, applies=lambda c: c.policy is not None and _writes(c), dump=_dump_manifest),
]


def _tvm_report(c: Compile) -> dict:
    return {"passes": c.manifest["passes"], "decode_kernels": c.decode_kernels, "library_kernels": c.built.info,
            "accuracy": c.manifest.get("accuracy"), "tuning": c.manifest["tuning"]}


# ---------------------------------------------------------------------------------------------
# The inductor route: the in-house baseline (compiler/inductor.py)


def _resolve_inductor(c: Compile) -> None:
    from . import inductor

    inductor.check_options(c.opts)
    c.opts = dataclasses.replace(c.opts, dtype="float32")


def _inductor_capture(c: Compile) -> None:
    from . import inductor

    c.captured = inductor.capture(c.loaded.model, c.opts.max_seq_len)


def _inductor_build(c: Compile) -> None:
    from . import inductor

    c.built = inductor.build(c.captured, c.out)  # the constants' names


def _inductor_package(c: Compile) -> None:
    from . import inductor

    stored = inductor.write_weights(c.captured, c.built, c.out / "weights.safetensors")
    c.manifest = dict(
        _manifest(c, "inductor"),
        target={"spec": "cpu", "device": "cpu", "cross": False},
        programs=dict(inductor.PROGRAMS),
        python_ops=c.captured.python_ops,
        weights={"file": "weights.safetensors", "constants": stored},
        quantization=None,
        kv_cache={"max_seq_len": c.opts.max_seq_len, "shapes": c.captured.kv_shapes},
        passes={})
    package.write_manifest(c.out, c.manifest)


INDUCTOR_PHASES = [
    Phase("load", lambda c: _load(c, materialize=True)),  # AOTInductor compiles the weights in: whole model
    Phase("capture", _inductor_capture, dump=_dump_graphs),
    Phase("build", _inductor_build),
    Phase("package", _inductor_package, dump=_dump_manifest),
]


@dataclass(frozen=True)
class Backend:
    resolve: Callable[[Compile], None]  # checks and completes the options before anything is loaded
    phases: list[Phase]
    report: Callable[[Compile], dict]  # the report's backend-specific fields


BACKENDS = {
    "tvm": Backend(_resolve_tvm, TVM_PHASES, _tvm_report),
    "inductor": Backend(_resolve_inductor, INDUCTOR_PHASES,
                        lambda c: {"passes": {}, "decode_kernels": None, "library_kernels": None, "accuracy": None,
                                   "tuning": None}),
}


def compile_model(opts: CompileOptions, log=print) -> dict:
    """Compile per `opts`; returns the report (also written to opts.report). Raises UserError."""
    if opts.backend not in BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r}; backends: {', '.join(BACKENDS)}")
    backend = BACKENDS[opts.backend]
    validate.options(opts)  # flags and output paths: before any work
    c = Compile(opts, log)
    backend.resolve(c)
    _check_config(c)
    if c.opts.plan and opts.backend != "tvm":
        raise UserError("--plan applies to the tvm backend")
    if not c.opts.plan:
        package.check_output(c.opts.output)
    dump = Path(c.opts.dump_ir) if c.opts.dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    if c.opts.plan:  # nothing is written: no staging folder
        _run_phases(backend.phases, c, dump)
        report = {"options": c.opts.as_dict(), "backend": c.opts.backend, "stages": c.seconds, "plan": c.plan}
    else:
        with package.staging(c.opts.output, log) as c.out:
            _run_phases(backend.phases, c, dump)
            size = sum(p.stat().st_size for p in c.out.rglob("*") if p.is_file())
        report = {"output": str(Path(c.opts.output).resolve()), "options": c.opts.as_dict(),
                  "backend": c.opts.backend, "stages": c.seconds, "artifact_bytes": size, **backend.report(c)}
        log(f"wrote {report['output']} ({size / 2**20:.1f} MiB) in {sum(c.seconds.values()):.1f} s")
    if c.opts.report:
        Path(c.opts.report).write_text(json.dumps(report, indent=2) + "\n")
    return report
