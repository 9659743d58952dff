"""ernie-run: generate text from a compiled artifact. Imports no compiler code (for CPU artifacts not
even TVM's compiler library), and torch only for an artifact of `--backend inductor`.

Output: the generated text is streamed to stdout as it comes. With --json nothing is streamed:
stdout holds exactly one JSON object (tokens, text, finish_reason, speeds), parseable on its own.
Every expected failure is one line on stderr and exit code 2 (errors.run_cli).
"""
from __future__ import annotations

import json
import sys

from ..errors import Parser, UserError, run_cli


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def _parser() -> Parser:
    p = Parser(prog="ernie-run", description="Run an ernie-compile artifact.",
               epilog="Output: the text streams to stdout; with --json stdout holds only one JSON object "
                      "(nothing streamed). Errors: one line on stderr, exit code 2.")
    p.add_argument("artifact", help="folder written by ernie-compile -o")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the artifact's tokenizer)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. 1,5,9")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="stop after this many new tokens (default 32; generation also stops at the "
                        "artifact's context limit)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, >= 0 (default 0)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image (PNG, JPEG) for a vision-language artifact; repeatable. With --prompt, one "
                        "user message holding the images then the text, through the artifact's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (tokens, text, finish_reason, speeds) and nothing else on stdout")
    return p


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    from .artifact import load_manifest
    from .session import Sampler, Session, check_prompt
    from .tvm_engine import import_runtime_only_tvm

    # flag values argparse's types let through (nan, -1, 0), refused before the artifact is read
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    manifest = load_manifest(args.artifact)  # read and verified once; the imports and Session use it
    if args.prompt_ids is not None:  # refused before the (possibly large) artifact is loaded
        check_prompt(args.prompt_ids, manifest.max_seq_len)
    if args.image and not manifest.data.get("vision"):
        raise UserError(f"--image: {manifest.folder} was compiled from a text-only model; it takes no images")
    if args.image and args.prompt is None:
        raise UserError("--image goes with --prompt (the chat template places the images)")
    spec = vision_spec(manifest.data["vision"]) if args.image else None
    images = [vision_input(path, spec) for path in args.image]  # read before the artifact loads
    import_runtime_only_tvm(manifest)
    session = Session(manifest)
    if images:
        prompt = image_prompt(session, args.prompt, [grid for _, grid in images], spec)
    else:
        prompt = args.prompt_ids if args.prompt is None else session.tokenizer.encode(args.prompt)
    check_prompt(prompt, session.max_seq_len)
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
                              on_token=None if args.json else stream, images=images or None)
    if args.json:
        out = {"tokens": result.tokens, "text": session.tokenizer.decode(result.tokens),
               "finish_reason": result.finish_reason, "prompt_tokens": len(prompt),
               "prefill_tok_s": round(result.prefill_tok_s, 2), "decode_tok_s": round(result.decode_tok_s, 2)}
        if images:
            from .vision import image_token_count

            out["image_tokens"] = [image_token_count(grid, spec.merge_size) for _, grid in images]
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        if result.finish_reason == "context":
            print(f"ernie-run: stopped at the artifact's context limit ({session.max_seq_len} tokens)",
                  file=sys.stderr)
    sys.stdout.flush()  # here, not at exit: a closed or full stdout is then reported like any error
    return 0


def vision_spec(data: dict):
    from .vision import VisionSpec

    return VisionSpec.from_json(data)


def vision_input(path: str, spec):
    """(patches, grid) of one --image file, as the checkpoint's image processor makes them."""
    from .vision import load_image, preprocess

    return preprocess(load_image(path), spec)


def image_prompt(session, text: str, grids: list, spec) -> list[int]:
    """The ids of one user message holding the images then `text`, through the artifact's chat template."""
    from ..serve.protocol import ChatFormat
    from .vision import build_prompt_ids

    chat = ChatFormat(session.folder, session.manifest.data["tokenizer"])
    return build_prompt_ids(session.tokenizer.encode, chat.render, grids, text, spec)


def main(argv=None) -> int:
    return run_cli("ernie-run", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
