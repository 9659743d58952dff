"""ernie-serve: an OpenAI-compatible HTTP server over one artifact (serve/app.py), with continuous
batching (serve/scheduler.py). Needs the `serve` extra: pip install -e ".[serve]".

SIGTERM (or Ctrl-C) drains: the listening socket closes, /health says "draining" and new requests
get 503, running requests finish; then the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

from ..errors import Parser, UserError, run_cli


def _parser() -> Parser:
    p = Parser(prog="ernie-serve", description="Serve an ernie-compile artifact over OpenAI's HTTP API.",
               epilog="Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions. "
                      "Errors before serving: one line on stderr, exit code 2.")
    p.add_argument("artifact", help="folder written by ernie-compile -o")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port; the line "
                                                            "'listening on http://HOST:PORT' on stdout says which)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated at once (one batch call per step)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more are answered 429")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled per step (longer prompts take several steps; running streams "
                        "keep getting a token per step meanwhile)")
    p.add_argument("--model-name", help="the model id /v1/models reports (default: the artifact folder's name)")
    return p


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    for flag in ("max_batch", "max_queue", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: must be in [0, 65535]")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"ernie-serve needs {e.name}: pip install -e '.[serve]'") from None
    from ..runtime.artifact import load_manifest
    from ..runtime.session import Session
    from ..runtime.tvm_engine import import_runtime_only_tvm
    from ..runtime.vision import VisionSpec
    from .app import Server, make_app
    from .scheduler import Scheduler

    manifest = load_manifest(args.artifact)
    import_runtime_only_tvm(manifest)
    session = Session(manifest)
    scheduler = Scheduler(session.engine, session.max_seq_len, session.eos_token_ids, max_batch=args.max_batch,
                          max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                          page_size=manifest.data["kv_cache"].get("page_size", 16),
                          vision=VisionSpec.from_json(manifest.data["vision"]) if manifest.data.get("vision") else None)
    server = Server(session, scheduler, args.model_name or Path(args.artifact).resolve().name)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.draining = True
            super().handle_exit(sig, frame)

    logging.basicConfig(level=logging.INFO, format="ernie-serve: %(message)s")
    config = uvicorn.Config(make_app(server), log_level="warning", timeout_graceful_shutdown=None)
    print(f"ernie-serve: {scheduler.mode}; chat: {server.chat.description}", flush=True)
    print(f"listening on http://{host}:{port}", flush=True)
    # uvicorn handles SIGTERM / SIGINT while it serves, then raises them again once drained: by then
    # they mean nothing more (run_cli's handler would turn a finished drain into exit code 2)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    DrainingServer(config).run(sockets=[sock])
    return 0


def main(argv=None) -> int:
    return run_cli("ernie-serve", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
