"""The minimal runtime: TVM's runtime, numpy and a tokenizer library; torch and safetensors only for
artifacts of `--backend inductor` (runtime/inductor_engine.py).

    from ernie_compile.runtime import Session
    s = Session("out/")
    result = s.generate(s.tokenizer.encode("Hello"), max_new_tokens=16)
"""
from .session import GenerationResult, Sampler, Session

__all__ = ["GenerationResult", "Sampler", "Session"]
