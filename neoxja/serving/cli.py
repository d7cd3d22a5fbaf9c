"""`neoxja serve`: an OpenAI-compatible server with continuous batching.

    neoxja serve                                  # the bundled model on http://127.0.0.1:8000
    neoxja serve --model DIR_OR_HUB_ID --api-key KEY --max-num-seqs 32

The server answers 503 on /health while the model loads, then 200. On SIGTERM it stops admitting
(503), lets the running requests finish within --shutdown-timeout seconds, and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neoxja serve", description="Serve a model with the OpenAI API.")
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="model directory or hub id (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype; auto: the device's preferred one (default auto)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="int8: int8 weights, CPU only; int4: 4-bit weights (groups of 128), quantized layer by layer "
                        "as they load, CPU or CUDA (default none; neither is batch-invariant)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: cuda when available (default)")
    p.add_argument("--max-num-seqs", type=int, default=16, metavar="N", help="sequences decoded together (default 16)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="positions per sequence, prompt included (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait for a slot; more get 429 (default 256)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (repeatable)")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="CORS origins to allow (default: none, no CORS headers)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja2 chat template over `messages`")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: its directory)")
    p.add_argument("--max-body", type=int, default=2 * 1024 * 1024, metavar="BYTES",
                   help="largest request body; larger ones get 413 (default 2 MB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to let running requests finish (default 30)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (compiled while loading, before /health says "
                        "200; pays off for a long-running server)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return p


def _fail(message: str) -> int:
    print(f"neoxja serve: error: {message}", file=sys.stderr)
    return 2


def load_chat_template(path: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {path}: cannot read it: {e}") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {path}, line {e.lineno}: {e.message}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_num_seqs", "max_queue", "max_body"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        return _fail(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be in [0, 65535], got {args.port}")
    if args.shutdown_timeout < 0:
        return _fail(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if any(not k for k in args.api_key):
        return _fail("--api-key must not be empty")
    from neoxja.generate_cli import check_quantize_device, int4_kernels_note, load_model, resolve_dtype, resolve_model

    try:
        model_path = resolve_model(args.model)
        chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))

    try:
        import uvicorn

        from neoxja.serving.server import ServerState, create_app
    except ImportError as e:
        return _fail(f"{e}: `neoxja serve` needs the serve extra: pip install 'neoxja[serve]'")

    name = args.served_model_name or (Path(model_path).name if Path(model_path).is_dir() else model_path)
    state = ServerState(model_name=name, max_body=args.max_body, api_keys=list(args.api_key),
                        chat_template=chat_template)
    app = create_app(state, args.allowed_origins)

    def load():
        try:
            import torch

            from neoxja.serving.async_engine import AsyncEngine
            from neoxja.serving.engine import Engine
            from neoxja.serving.metrics import Metrics
            from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

            device = args.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            check_quantize_device(args.quantize, device)
            dtype, dtype_reason = resolve_dtype(args.dtype, torch.device(device), args.quantize)
            tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(model_path)
            model = load_model(model_path, args.quantize, dtype, device)
            if args.quantize == "none":
                from neoxja.batch_invariant import make_batch_invariant

                make_batch_invariant(model)  # a request's tokens do not depend on what shares its batch
            metrics = Metrics(name)
            engine = Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            metrics=metrics, compile=args.compile)
            if args.compile:  # before /health says 200: no request waits for a compilation
                print("neoxja serve: compiling the decode step (inductor caches it on disk for later starts)",
                      file=sys.stderr, flush=True)
                try:
                    engine.warm_up()
                except RuntimeError as e:  # torch.compile failing on this machine (no C++ compiler, ...)
                    if not isinstance(e, torch._dynamo.exc.TorchDynamoException):
                        raise
                    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                    raise RuntimeError(f"--compile: torch.compile failed on this machine ({first.strip()}); "
                                       "run without --compile") from None
            state.tokenizer, state.metrics, state.max_model_len = tokenizer, metrics, engine.max_model_len
            state.engine = AsyncEngine(engine, max_queue=args.max_queue)
            quantized = "" if args.quantize == "none" else f", {args.quantize} weights{int4_kernels_note(model)}"
            print(f"neoxja serve: {name} ready ({device}, {str(dtype).removeprefix('torch.')} ({dtype_reason})"
                  f"{quantized}, {args.max_num_seqs} slots of {engine.max_model_len} positions)",
                  file=sys.stderr, flush=True)
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            print(f"neoxja serve: error: the model failed to load: {state.load_error}", file=sys.stderr, flush=True)
            server.should_exit = True

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and not state.draining and not self.should_exit:
                state.draining = True  # new requests get 503; the running ones go on
                threading.Thread(target=drain, daemon=True).start()
                return
            super().handle_exit(sig, frame)

    def drain():
        deadline = time.monotonic() + args.shutdown_timeout
        engine = state.engine
        while engine is not None and engine.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine is not None and engine.num_unfinished:
            for request_id in list(engine.engine.requests):
                engine._submit(lambda rid=request_id: engine.engine.abort(rid))
            time.sleep(0.5)
        server.should_exit = True

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    server = Server(config)
    threading.Thread(target=load, name="neoxja-load", daemon=True).start()
    announce_port(server)
    server.run()
    if state.engine is not None:
        state.engine.shutdown()
    return 1 if state.load_error else 0


def announce_port(server, name: str = "neoxja serve") -> None:
    """Print "NAME: listening on http://HOST:PORT" on stderr once uvicorn listens (so --port 0 can be used).
    The benchmarks' servers (serve_baseline.py, serve_floor.py) announce themselves with it too."""

    def wait():
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        for s in getattr(server, "servers", []) or []:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"{name}: listening on http://{host}:{port}", file=sys.stderr, flush=True)
                return

    threading.Thread(target=wait, daemon=True).start()
