"""ernie-compile: parse and validate arguments, then call the Python API (compiler/pipeline.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import Parser, UserError, run_cli

# --target's help: every spec targets/__init__.py's TARGETS accepts (tests/test_errors.py checks the
# list against the registry; written out so that --help needs no TVM import)
TARGET_HELP = ("cpu (this machine), cpu:LLVM_TRIPLE (a cross build, e.g. cpu:aarch64-linux-android), "
               "cuda (or cuda:sm_80,sm_90), metal (macOS), metal:ios, webgpu (browsers and any wgpu "
               "adapter), vulkan (a WebGPU artifact run on a Vulkan adapter)")


def _parser() -> Parser:
    from .compiler.presets import DEFAULT_PRESET, PRESETS

    p = Parser(prog="ernie-compile", description="Compile an ERNIE 4.5 checkpoint ahead of time.",
               epilog="Errors in the input: one line on stderr, exit code 2.")
    p.add_argument("--model", help=f"Hugging Face checkpoint folder, or a preset with random weights "
                                   f"({', '.join(PRESETS)}); default: the embedded {DEFAULT_PRESET}")
    p.add_argument("--target", default="cpu", help=TARGET_HELP)
    p.add_argument("--cuda-arch", help="GPU architectures of a cuda build, e.g. sm_80,sm_90 "
                                       "(default: sm_80,sm_86,sm_89,sm_90)")
    p.add_argument("--backend", default="tvm", choices=["tvm", "inductor"],
                   help="tvm, or inductor: torch.export + AOTInductor with a static KV cache, "
                        "our in-house baseline (cpu, float32 only; it loads the whole model into memory, "
                        "where tvm streams the weights one tensor at a time)")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact folder to write")
    p.add_argument("--dtype", choices=["float32", "float16"],
                   help="activations and float weights (default: float32 on cpu, float16 on GPU targets)")
    p.add_argument("--max-seq-len", type=int, help="context limit, prompt + new tokens "
                                                   "(default: 2048 or the model's limit if smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--preset-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset's config field, e.g. num_hidden_layers=2 (benchmarks; repeatable; "
                        "default: none)")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="keep q/k/v projections and RoPE unfused (a baseline for benchmarks)")
    q = p.add_argument_group("weight quantization (group-wise, dequantized inside the kernels)")
    q.add_argument("--bits", help="2, 3, 4 or 8 for every linear weight of the text model, or per category, e.g. "
                                  "experts=2,attn=4,mlp=4,embed=8,vision=8 (categories left out stay float32; "
                                  "vision: the VL model's vision tower, only when named; default: none, float weights)")
    q.add_argument("--embed-bits", type=int, help="bits of the embedding / lm_head (overrides --bits; "
                                                  "default: as --bits)")
    q.add_argument("--group-size", type=int, default=32, help="values per scale")
    q.add_argument("--asymmetric", action="store_true", help="per-group offset instead of symmetric codes")
    q.add_argument("--scale-dtype", default=None, choices=["float16", "float32"],
                   help="group scales (default float16; float32 for --target webgpu/vulkan in float32, "
                        "whose adapters may lack shader-f16)")
    q.add_argument("--act-bits", default="auto", choices=["auto", "8", "none"],
                   help="8: linears over 4/8-bit weights quantize their input activations to int8 per "
                        "block of 32 (AVX-512 VNNI kernels, faster, slightly less accurate); none: float32 "
                        "activations; auto (default): 8 where the target CPU has AVX-512 VNNI")
    t = p.add_argument_group("schedule tuning (measured on this machine, kept in a database)")
    t.add_argument("--tune", action="store_true", help="measure the schedule candidates the database lacks")
    t.add_argument("--tuning-db", type=Path, help="tuning database (JSON lines; default with --tune: "
                                                  "~/.cache/ernie-compile/tuning-db.jsonl); without --tune: "
                                                  "use its best schedules, search nothing")
    t.add_argument("--tune-trials", type=int, help="at most this many measurements in this compile "
                                                   "(default: no limit)")
    t.add_argument("--tune-minutes", type=float, help="stop measuring after this many minutes (default: no limit)")
    p.add_argument("--plan", action="store_true",
                   help="lower the model, then print the artifact's size and the memory to compile and run it "
                        "(weights + KV cache at --max-seq-len); writes nothing")
    p.add_argument("--dump-ir", type=Path, help="write each phase's IR into this folder (default: not written)")
    p.add_argument("--report", type=Path, help="write stage timings and pass counts as JSON (default: not written)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def _override(text: str) -> tuple[str, int | float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key, (float(value) if "." in value or "e" in value else int(value))
    except ValueError:
        raise UserError(f"--preset-override {text!r}: expected KEY=NUMBER") from None


def _compile(argv) -> int:
    args = _parser().parse_args(argv)
    from .compiler.options import CompileOptions
    from .compiler.pipeline import compile_model

    target = args.target
    if args.cuda_arch:
        if target.partition(":")[0] != "cuda":
            raise UserError(f"--cuda-arch applies to --target cuda, not {target!r}")
        target = f"cuda:{args.cuda_arch}"
    opts = CompileOptions(output=args.output, model=args.model, backend=args.backend, target=target,
                          max_seq_len=args.max_seq_len, seed=args.seed, dump_ir=args.dump_ir,
                          fuse_attention=not args.no_fuse_attention, dtype=args.dtype,
                          preset_overrides=tuple(_override(o) for o in args.preset_override),
                          report=args.report, plan=args.plan, bits=args.bits, embed_bits=args.embed_bits,
                          group_size=args.group_size, symmetric=not args.asymmetric,
                          scale_dtype=args.scale_dtype, act_bits=args.act_bits, tune=args.tune,
                          tuning_db=args.tuning_db, tune_trials=args.tune_trials, tune_minutes=args.tune_minutes)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    compile_model(opts, log=(lambda *_: None) if args.quiet else print)
    return 0


def main(argv=None) -> int:
    return run_cli("ernie-compile", lambda: _compile(argv))


if __name__ == "__main__":
    sys.exit(main())
