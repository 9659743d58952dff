"""The resolved options of one compile: printed at start, written into the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class CompileOptions:
    output: Path
    model: str | None = None  # folder, preset name, or None for the embedded default
    backend: str = "tvm"  # "tvm", or "inductor": the AOTInductor baseline (compiler/inductor.py)
    target: str = "cpu"  # NAME[:LLVM_TRIPLE], see targets/
    max_seq_len: int | None = None  # context limit, prompt + new tokens; None: min(2048, the model's)
    seed: int = 0  # random weights of presets
    preset_overrides: tuple[tuple[str, int | float], ...] = ()  # config fields changed in a preset
    fuse_attention: bool = True  # False: the unfused attention route, a baseline for benchmarks
    dtype: str | None = None  # activations and float weights; None: the target's default
    # weight quantization (ernie_compile/quant.py): None = float32 weights
    bits: str | None = None  # "4", or per category "experts=2,attn=4,mlp=4,embed=8"
    embed_bits: int | None = None  # the embedding / lm_head, overriding --bits
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: str | None = None  # None: the target's choice (float16; float32 for float32 WebGPU)
    # "8": linears over 4/8-bit weights quantize activations to int8 per block of 32 (x86 VNNI kernels);
    # "none": float32 activations; "auto": "8" where the target has AVX-512 VNNI, else "none"
    act_bits: str = "auto"
    # schedule tuning (compiler/tuning.py)
    tune: bool = False  # measure the schedule candidates the database lacks
    tuning_db: Path | None = None
    tune_trials: int | None = None  # measurement budget of this compile
    tune_minutes: float | None = None
    plan: bool = False  # lower, then print the artifact's size and the memory to compile and run it; write nothing
    dump_ir: Path | None = None
    report: Path | None = None

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
