"""Regenerate ernie_compile/assets/tokenizer.model, the embedded default's small sentencepiece model.

ERNIE 4.5 ships a sentencepiece `tokenizer.model`; the embedded default ships one of the same kind,
trained on English prose that every Python install carries (the standard library's docstrings), so
the tool runs offline. Special ids follow ERNIE's config: unk=0, bos=1, eos=2.
Run: python tools/make_default_tokenizer.py
"""
import importlib
import io
import pathlib
import pkgutil

import sentencepiece as spm

MODULES = ["argparse", "collections", "json", "logging", "os", "pathlib", "re", "statistics", "string",
           "textwrap", "typing", "unittest", "urllib.request", "email", "http.client", "asyncio", "csv",
           "datetime", "decimal", "fractions", "functools", "itertools", "random", "shutil", "subprocess",
           "tarfile", "threading", "zipfile", "heapq", "inspect", "doctest", "pydoc", "difflib", "calendar"]


def corpus() -> str:
    lines = []
    for name in sorted(MODULES):
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and getattr(obj, "__module__", name) == name:
                lines.extend(line.strip() for line in doc.splitlines() if line.strip())
    return "\n".join(dict.fromkeys(lines))


def main() -> None:
    out = pathlib.Path(__file__).resolve().parents[1] / "ernie_compile" / "assets" / "tokenizer"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus().splitlines()), model_writer=model,
                                   vocab_size=1024, model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   num_threads=1, minloglevel=2, normalization_rule_name="identity")
    out.with_suffix(".model").write_bytes(model.getvalue())
    print(f"wrote {out.with_suffix('.model')} ({len(model.getvalue())} bytes)")


if __name__ == "__main__":
    main()
