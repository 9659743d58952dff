"""The one place that decides stage order.

    Phase 0. resolve   options + target (cheap checks first: nothing is loaded for a bad flag)
    Phase 1. load      checkpoint folder / preset → transformers model (compiler/load.py)
    Phase 2. capture   torch.export of prefill and decode, attention routed through our op (capture.py)
    Phase 3. lower     ExportedPrograms → Relax IRModule; graph passes run here (lower.py, passes/)
    Phase 4. build     Relax → target library (targets/)
    Phase 5. package   artifact folder with manifest and hashes (package.py)

`--backend inductor` (compiler/inductor.py) takes its own route after load: capture with a static KV
cache, build with AOTInductor, package; phases 3 and 4 are one AOTInductor call.

`--dump-ir DIR` writes each phase's IR; `--report FILE` writes timings and pass counts as JSON.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserError
from ..passes import quantize_weights, select_passes, split_large_weights
from ..targets import get_target
from . import package
from .inspect import count_kernels
from .lower import PAGE_SIZE
from .options import CompileOptions
from .quantize import QuantPolicy

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_TUNING_DB = Path.home() / ".cache" / "ernie-compile" / "tuning-db.jsonl"


class _Stages:
    """Times each phase and tells the user where the compile is."""

    def __init__(self, log):
        self.log, self.seconds = log, {}

    @contextmanager
    def __call__(self, name: str):
        self.log(f"[{name}] …")
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 3)
        self.log(f"[{name}] {self.seconds[name]:.2f} s")


def _versions() -> dict:
    import torch
    import transformers
    import tvm

    return {"ernie_compile": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tvm": tvm.__version__}


def _accuracy(model, folder: Path, config, target, recon_errors: dict) -> dict:
    """Quantized vs float: KL and top-1 on a fixed prompt set (compiler/accuracy.py), per-weight error."""
    from .accuracy import measure

    result = {"weight_rel_error": recon_errors}
    if target.runnable_here:
        result.update(measure(model, folder, config.vocab_size))
    else:
        result["note"] = f"KL / top-1 not measured: a {target.spec} artifact does not run on this machine"
    return result


def _log_accuracy(acc: dict, log) -> None:
    errs = acc["weight_rel_error"]
    worst = max(errs, key=errs.get) if errs else None
    line = f"  accuracy vs float: weight error mean {np.mean(list(errs.values())):.4f}"
    if worst:
        line += f", worst {errs[worst]:.4f} ({worst})"
    if "kl_mean" in acc:
        line += (f"; KL mean {acc['kl_mean']:.5f} max {acc['kl_max']:.5f}, "
                 f"top-1 agreement {100 * acc['top1_agreement']:.1f}%")
    log(line)


def _tuner(opts: CompileOptions, log):
    from .tuning import Tuner, TuningDB

    if opts.tuning_db is None:
        return Tuner()
    db = TuningDB.open(opts.tuning_db)
    if opts.tune:
        log(f"tuning: measuring missing schedule candidates on this machine into {db.path}")
    return Tuner(db, search=opts.tune, max_trials=opts.tune_trials, log=log,
                 max_seconds=opts.tune_minutes * 60 if opts.tune_minutes else None)


def _manifest(opts: CompileOptions, loaded, backend: str) -> dict:
    """The manifest fields every backend writes; each adds its own entry points and files."""
    config = loaded.model.config
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "model": {"source": loaded.source, "model_type": config.model_type,
                  "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
                  "config": json.loads(config.to_json_string(use_diff=False))},
        "options": opts.as_dict(),
        "versions": _versions(),
        "dtype": opts.dtype,
        "vocab_size": config.vocab_size,
    }


def _tokenizer(loaded, folder: Path) -> dict:
    eos = loaded.model.config.eos_token_id
    return {"files": package.copy_tokenizer(loaded.tokenizer_files, folder),
            "bos_token_id": loaded.model.config.bos_token_id,
            "eos_token_ids": eos if isinstance(eos, list) else [eos]}


def _act_bits(opts: CompileOptions, target) -> str:
    """--act-bits resolved: "8" or "none" (recorded in the manifest's options)."""
    if opts.act_bits not in ("auto", "8", "none"):
        raise UserError(f"--act-bits {opts.act_bits}: auto, 8 or none")
    if opts.bits is None and opts.embed_bits is None:
        return "none"  # float weights: activations stay float too
    vnni = getattr(target, "int8_dot", False)
    if opts.act_bits == "8" and not vnni:
        raise UserError(f"--act-bits 8: target {target.spec} has no AVX-512 VNNI; use --act-bits none")
    if opts.act_bits == "auto":
        return "8" if vnni else "none"
    return opts.act_bits


def compile_model(opts: CompileOptions, log=print) -> dict:
    """Compile per `opts`; returns the report (also written to opts.report). Raises UserError."""
    if opts.backend not in BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r}; backends: {', '.join(BACKENDS)}")
    backend = BACKENDS[opts.backend]
    opts, resolved = backend.resolve(opts, log)
    if opts.max_seq_len is not None and opts.max_seq_len < 2:
        raise UserError(f"--max-seq-len {opts.max_seq_len}: must be at least 2")
    package.check_output(opts.output)
    stages = _Stages(log)
    dump = Path(opts.dump_ir) if opts.dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)

    from .load import load

    with stages("load"):
        loaded = load(opts.model, opts.seed, dict(opts.preset_overrides))
    config = loaded.model.config
    if opts.max_seq_len is None:
        opts = dataclasses.replace(opts, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings))
    elif opts.max_seq_len > config.max_position_embeddings:
        raise UserError(f"--max-seq-len {opts.max_seq_len} exceeds the model's max_position_embeddings "
                        f"({config.max_position_embeddings})")
    log("options: " + json.dumps(opts.as_dict()))

    outcome = backend.run(opts, resolved, loaded, stages, dump, log)
    report = {"output": str(Path(opts.output).resolve()), "options": opts.as_dict(), "backend": opts.backend,
              "stages": stages.seconds, **outcome}
    log(f"wrote {report['output']} ({report['artifact_bytes'] / 2**20:.1f} MiB) in "
        f"{sum(stages.seconds.values()):.1f} s")
    if opts.report:
        Path(opts.report).write_text(json.dumps(report, indent=2) + "\n")
    return report


class _Tvm:
    """Phases 2–5 through TVM (the default backend)."""

    @staticmethod
    def resolve(opts: CompileOptions, log):
        target = get_target(opts.target)
        tvm_target = target.tvm_target()
        opts = dataclasses.replace(opts, act_bits=_act_bits(opts, target))
        if getattr(target.kernels, "KV_CACHE", "paged") == "contiguous" and not opts.fuse_attention:
            raise UserError(f"--no-fuse-attention: target {target.name} attends through its own KV-cache kernels, "
                            "which the fused attention route feeds")
        dtype = opts.dtype or target.dtypes[0]
        if dtype not in target.dtypes:
            raise UserError(f"--dtype {dtype}: target {target.name} computes in {' or '.join(target.dtypes)}")
        # group scales in float16 unless the target says otherwise (WebGPU: float16 needs shader-f16)
        scale_dtype = opts.scale_dtype or getattr(target, "scale_dtype", lambda _: "float16")(dtype)
        opts = dataclasses.replace(opts, dtype=dtype, scale_dtype=scale_dtype)
        policy = QuantPolicy.parse(opts.bits, opts.embed_bits, opts.group_size, opts.symmetric, opts.scale_dtype,
                                   8 if opts.act_bits == "8" else None)
        if opts.tune and opts.tuning_db is None:
            opts = dataclasses.replace(opts, tuning_db=DEFAULT_TUNING_DB)
        if opts.tune and not getattr(target.kernels, "TUNABLE", None):
            raise UserError(f"--tune: target {target.name} has no kernels with schedule parameters to search")
        if opts.tune and not target.runnable_here:
            raise UserError(f"--tune measures kernels on this machine; a {target.spec} build does not run here "
                            f"(tune on the device, then pass --tuning-db)")
        return opts, (target, tvm_target, policy, _tuner(opts, log))

    @staticmethod
    def run(opts, resolved, loaded, stages, dump, log) -> dict:
        from .capture import capture
        from .load import cast
        from .lower import lower

        target, tvm_target, policy, tuner = resolved
        config, dtype = loaded.model.config, opts.dtype
        cast(loaded.model, dtype)
        passes = select_passes(config, fuse_attention=opts.fuse_attention)
        with stages("capture"):
            captured = capture(loaded.model, opts.max_seq_len, passes,
                               ids_dtype=getattr(target.kernels, "INDEX_DTYPE", "int64"))
        if dump:
            for name in ("prefill", "decode"):
                (dump / f"2-capture.{name}.txt").write_text(str(getattr(captured, name).graph_module.code))

        with stages("lower"):
            mod, pass_reports, weights = lower(captured, config, target, passes, dtype, opts.max_seq_len)
            if getattr(target, "max_binding_bytes", None):  # webgpu: every weight must fit one binding
                mod, weights, split_report = split_large_weights.run(mod, weights, target.max_binding_bytes, policy,
                                                                     target.kernels.QUANT_LAYOUTS)
                pass_reports.append(split_report)
            if policy:
                mod, weights, qreport = quantize_weights.run(mod, weights, policy, target.kernels)
                pass_reports.append(qreport)
            mod, target_reports = target.passes(mod, tuner)
            pass_reports += target_reports
            kernels = count_kernels(mod, "decode")
        log(f"  decode step: {kernels['tir']} TIR kernels, {kernels['builtin']} runtime builtin calls")
        if opts.tuning_db:
            log(f"  tuning: {tuner.stats}")
        for r in pass_reports:
            log(f"  pass {r}")
        if dump:
            (dump / "3-lower.relax.py").write_text(mod.script(show_meta=False))

        with package.staging(opts.output) as tmp:
            # a target with `finish` (webgpu) builds a launch plan sized by max_seq_len and moves
            # the weights into its own files once they are written
            planned = hasattr(target, "finish")
            with stages("build"):
                library, build_info = target.build(mod, tmp, **({"max_seq_len": opts.max_seq_len} if planned else {}))
            if "launches" in build_info:  # a launch plan: what a host dispatches per call
                log("  launch plan: " + ", ".join(f"{f} {n} kernels" for f, n in build_info["launches"].items()))
            with stages("package"):
                state = loaded.model.state_dict()
                order, recon_errors = package.write_weights(state, weights, tmp / "weights.safetensors")
                stored = {"file": "weights.safetensors", "order": order}
                tokenizer = _tokenizer(loaded, tmp)
                if planned:
                    stored = target.finish(tmp, tmp / "weights.safetensors", order, tokenizer)
                    if "warning" in stored:
                        log("  " + stored.pop("warning"))
                manifest = dict(
                    _manifest(opts, loaded, getattr(target, "backend", "tvm")),
                    target={"spec": target.spec, "device": target.device, "tvm": str(tvm_target),
                            "cross": not target.runnable_here},
                    library=library.name,
                    kernels=build_info,
                    functions={"prefill": "prefill", "decode": "decode", "create_kv": "create_kv"},
                    weights={**stored,
                             "fused": {w["name"]: w["concat"] for w in weights if "concat" in w},
                             "quantized": {w["name"]: w["quant"] for w in weights if "quant" in w}},
                    quantization=policy.as_dict() if policy else None,
                    kv_cache={"max_seq_len": opts.max_seq_len, "page_size": PAGE_SIZE},
                    tokenizer=tokenizer,
                    passes={r.name: {"matched": r.matched, "expected": r.expected} for r in pass_reports},
                    tuning=tuner.report() if opts.tuning_db else None)
                package.write_manifest(tmp, manifest)
            if policy:
                with stages("accuracy"):
                    manifest["accuracy"] = _accuracy(loaded.model, tmp, config, target, recon_errors)
                    package.write_manifest(tmp, manifest)
                _log_accuracy(manifest["accuracy"], log)
            size = _size(tmp)
        return {"passes": manifest["passes"], "decode_kernels": kernels, "library_kernels": build_info,
                "artifact_bytes": size, "accuracy": manifest.get("accuracy"), "tuning": manifest["tuning"]}


class _Inductor:
    """Phases 2–5 through torch.export + AOTInductor (compiler/inductor.py): the in-house baseline."""

    @staticmethod
    def resolve(opts: CompileOptions, log):
        from . import inductor

        inductor.check_options(opts)
        return dataclasses.replace(opts, dtype="float32"), None

    @staticmethod
    def run(opts, resolved, loaded, stages, dump, log) -> dict:
        from . import inductor

        with stages("capture"):
            captured = inductor.capture(loaded.model, opts.max_seq_len)
        if dump:
            for name in inductor.PROGRAMS:
                (dump / f"2-capture.{name}.txt").write_text(str(getattr(captured, name).graph_module.code))
        with package.staging(opts.output) as tmp:
            with stages("build"):
                constants = inductor.build(captured, tmp)
            with stages("package"):
                stored = inductor.write_weights(captured, constants, tmp / "weights.safetensors")
                manifest = dict(
                    _manifest(opts, loaded, "inductor"),
                    target={"spec": "cpu", "device": "cpu", "cross": False},
                    programs=dict(inductor.PROGRAMS),
                    python_ops=captured.python_ops,
                    weights={"file": "weights.safetensors", "constants": stored},
                    quantization=None,
                    kv_cache={"max_seq_len": opts.max_seq_len, "shapes": captured.kv_shapes},
                    tokenizer=_tokenizer(loaded, tmp),
                    passes={})
                package.write_manifest(tmp, manifest)
            size = _size(tmp)
        return {"passes": {}, "decode_kernels": None, "library_kernels": None, "artifact_bytes": size,
                "accuracy": None, "tuning": None}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --backend NAME → its phases 2–5. `resolve` checks the options before anything is loaded (and returns
# them completed); `run` writes the artifact and returns the report's backend-specific fields.
BACKENDS = {"tvm": _Tvm, "inductor": _Inductor}
