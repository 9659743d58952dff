"""Text ↔ ids with whatever tokenizer files the artifact carries (tokenizer.json or tokenizer.model)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


class Tokenizer:
    def __init__(self, folder: Path, info: dict):
        files = set(info.get("files", ()))
        self.bos_token_id = info.get("bos_token_id")
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids)
        elif "tokenizer.model" in files:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._encode = sp.encode
            self._decode = sp.decode
        else:
            self._encode = None

    @property
    def available(self) -> bool:
        return self._encode is not None

    def encode(self, text: str) -> list[int]:
        if not self.available:
            raise UserError("this artifact has no tokenizer files; pass --prompt-ids instead of --prompt")
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids)) if self.available else ""
