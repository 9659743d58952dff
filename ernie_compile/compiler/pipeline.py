"""The one place that decides stage order.

    Phase 0. resolve   options + target (cheap checks first: nothing is loaded for a bad flag)
    Phase 1. load      checkpoint folder / preset → transformers model (compiler/load.py)
    Phase 2. capture   torch.export of prefill and decode, attention routed through our op (capture.py)
    Phase 3. lower     ExportedPrograms → Relax IRModule; graph passes run here (lower.py, passes/)
    Phase 4. build     Relax → target library (targets/)
    Phase 5. package   artifact folder with manifest and hashes (package.py)

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
from ..passes import quantize_weights, select_passes
from ..targets import get_target
from . import package
from .inspect import count_kernels
from .lower import PAGE_SIZE
from .options import CompileOptions
from .quantize import QuantPolicy

DEFAULT_MAX_SEQ_LEN = 2048


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
    target = get_target(opts.target)
    tvm_target = target.tvm_target()
    opts = dataclasses.replace(opts, act_bits=_act_bits(opts, target))
    policy = QuantPolicy.parse(opts.bits, opts.embed_bits, opts.group_size, opts.symmetric, opts.scale_dtype,
                               8 if opts.act_bits == "8" else None)
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

    from .capture import capture

    passes = select_passes(config, fuse_attention=opts.fuse_attention)
    with stages("capture"):
        captured = capture(loaded.model, opts.max_seq_len, passes)
    if dump:
        for name in ("prefill", "decode"):
            (dump / f"2-capture.{name}.txt").write_text(str(getattr(captured, name).graph_module.code))

    from .lower import lower

    with stages("lower"):
        mod, pass_reports, weights = lower(captured, config, tvm_target, passes)
        if policy:
            mod, weights, qreport = quantize_weights.run(mod, weights, policy)
            pass_reports.append(qreport)
        mod, target_reports = target.passes(mod)
        pass_reports += target_reports
        kernels = count_kernels(mod, "decode")
    log(f"  decode step: {kernels['tir']} TIR kernels, {kernels['builtin']} runtime builtin calls")
    for r in pass_reports:
        log(f"  pass {r}")
    if dump:
        (dump / "3-lower.relax.py").write_text(mod.script(show_meta=False))

    with package.staging(opts.output) as tmp:
        with stages("build"):
            library = target.build(mod, tmp)
        with stages("package"):
            state = loaded.model.state_dict()
            order, recon_errors = package.write_weights(state, weights, tmp / "weights.safetensors")
            tokenizer_files = package.copy_tokenizer(loaded.tokenizer_files, tmp)
            eos = config.eos_token_id
            manifest = {
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": {"source": loaded.source, "model_type": config.model_type,
                          "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
                          "config": json.loads(config.to_json_string(use_diff=False))},
                "options": opts.as_dict(),
                "target": {"spec": target.spec, "device": target.device, "tvm": str(tvm_target),
                           "runnable_here": target.runnable_here},
                "versions": _versions(),
                "dtype": "float32",
                "library": library.name,
                "functions": {"prefill": "prefill", "decode": "decode", "create_kv": "create_kv"},
                "weights": {"file": "weights.safetensors", "order": order,
                            "fused": {w["name"]: w["concat"] for w in weights if "concat" in w},
                            "quantized": {w["name"]: w["quant"] for w in weights if "quant" in w}},
                "quantization": policy.as_dict() if policy else None,
                "kv_cache": {"max_seq_len": opts.max_seq_len, "page_size": PAGE_SIZE},
                "vocab_size": config.vocab_size,
                "tokenizer": {"files": tokenizer_files, "bos_token_id": config.bos_token_id,
                              "eos_token_ids": eos if isinstance(eos, list) else [eos]},
                "passes": {r.name: {"matched": r.matched, "expected": r.expected} for r in pass_reports},
            }
            package.write_manifest(tmp, manifest)
        if policy:
            with stages("accuracy"):
                manifest["accuracy"] = _accuracy(loaded.model, tmp, config, target, recon_errors)
                package.write_manifest(tmp, manifest)
            _log_accuracy(manifest["accuracy"], log)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())

    report = {"output": str(Path(opts.output).resolve()), "options": opts.as_dict(), "stages": stages.seconds,
              "passes": manifest["passes"], "decode_kernels": kernels, "artifact_bytes": size,
              "accuracy": manifest.get("accuracy")}
    log(f"wrote {report['output']} ({size / 2**20:.1f} MiB) in {sum(stages.seconds.values()):.1f} s")
    if opts.report:
        Path(opts.report).write_text(json.dumps(report, indent=2) + "\n")
    return report
