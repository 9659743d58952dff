"""ernie-run: generate text from a compiled artifact. Imports no compiler code (for CPU artifacts not
even TVM's compiler library), and torch only for an artifact of `--backend inductor`."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import USER_ERROR_EXIT, UserError


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ernie-run", description="Run an ernie-compile artifact.")
    p.add_argument("artifact", help="folder written by ernie-compile -o")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the artifact's tokenizer)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. 1,5,9")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    try:
        args = p.parse_args(argv)
        if args.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        from .artifact import read_manifest
        from .session import Sampler, Session
        from .tvm_engine import import_runtime_only_tvm

        import_runtime_only_tvm(read_manifest(args.artifact, verify=False))
        sampler = Sampler(args.temperature, args.top_p, args.seed)
        session = Session(args.artifact)
        prompt = args.prompt_ids if args.prompt is None else session.tokenizer.encode(args.prompt)
        new: list[int] = []
        shown = ""

        def stream(token: int) -> None:  # print the text delta: pieces can merge across tokens
            nonlocal shown
            new.append(token)
            text = session.tokenizer.decode(new)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

        result = session.generate(prompt, args.max_new_tokens, sampler, stop_at_eos=not args.ignore_eos,
                                  on_token=stream)
        sys.stdout.write("\n")
        if args.json:
            print(json.dumps({"tokens": result.tokens, "text": session.tokenizer.decode(result.tokens),
                              "prompt_tokens": len(prompt), "prefill_tok_s": round(result.prefill_tok_s, 2),
                              "decode_tok_s": round(result.decode_tok_s, 2)}))
        return 0
    except UserError as e:
        print(f"ernie-run: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
