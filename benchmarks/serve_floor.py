"""The transport floor: an HTTP server that answers a streaming completion without computing anything.

`bench_serve.py` times it with the same client and the same request body as `neoxja serve`, to measure what
the HTTP path alone costs on this machine: connection reuse, request parsing, one SSE chunk with text, the
usage chunk and `data: [DONE]`, and the client's own parsing. Any server's TTFT is at least this floor plus
the time to compute the first token, so a model whose first token takes less than ten times the floor
cannot meet "idle TTFT within 10% of a direct generate() call" behind any Python HTTP server on this stack.

It is a raw ASGI callable on uvicorn (no framework, no validation: the least a Python server can do), run
with the same uvicorn settings (its automatic choice of event loop and HTTP parser: uvloop and httptools,
which `neoxja[serve]` installs) as `neoxja serve`. `--loop asyncio --http h11` gives uvicorn's pure-Python
fallbacks, to measure what the two packages are worth.

    python benchmarks/serve_floor.py --port 0    # prints "listening on http://..." on stderr
    python benchmarks/serve_floor.py --port 0 --loop asyncio --http h11
"""

from __future__ import annotations

import argparse
import json
import sys
import time


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:  # the whole request body, as any server must read it
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    prompt_tokens = len(request.get("prompt") or [])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    created = int(time.time())
    for chunk in (
        {"id": "cmpl-floor", "object": "text_completion", "created": created, "model": "floor",
         "choices": [{"index": 0, "text": "。", "logprobs": None, "finish_reason": None}]},
        {"id": "cmpl-floor", "object": "text_completion", "created": created, "model": "floor",
         "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]},
        {"id": "cmpl-floor", "object": "text_completion", "created": created, "model": "floor", "choices": [],
         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}},
    ):
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def main(argv=None) -> int:
    import uvicorn

    from neoxja.serving.cli import announce_port  # the same "listening on" line as neoxja serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002, help="0: any free port (printed on stderr)")
    p.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="uvicorn's --loop")
    p.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"), help="uvicorn's --http")
    args = p.parse_args(argv)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, loop=args.loop, http=args.http))

    announce_port(server, "serve_floor")
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
