"""Text ↔ ids with whatever tokenizer files the artifact carries (tokenizer.json or tokenizer.model)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

UNKNOWN = " ⁇ "


class Tokenizer:
    def __init__(self, folder: Path, info: dict):
        files = set(info.get("files", ()))
        self.pieces = None  # SentencePiece pieces by id, when that is the tokenizer
        self.bos_token_id = info.get("bos_token_id")
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids)
            self.size = tok.get_vocab_size()
        elif "tokenizer.model" in files:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._encode = sp.encode
            self._decode = sp.decode
            self.size = sp.vocab_size()
            # for hosts without SentencePiece: each id's text, control tokens empty, <unk> as its mark
            self.pieces = ["" if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else sp.id_to_piece(i)
                           for i in range(self.size)]
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
        """Text of `ids`. Ids the tokenizer does not know (a model vocabulary padded past the
        tokenizer's, or a preset with random weights) show as sentencepiece's unknown mark."""
        if not self.available:
            return ""
        text, run = [], []
        for i in ids:
            if 0 <= i < self.size:
                run.append(i)
                continue
            if run:
                text.append(self._decode(run))
                run = []
            text.append(UNKNOWN)
        if run:
            text.append(self._decode(run))
        return "".join(text)
