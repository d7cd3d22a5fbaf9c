"""The serving baseline a user would write today: transformers' `generate` behind a minimal HTTP endpoint.

`bench_serve.py` compares `neoxja serve` with this. It is deliberately what one writes in an afternoon:
transformers' `GPTNeoXJapaneseForCausalLM.generate` on one checkpoint directory, an OpenAI-like streaming
`POST /v1/completions`, and a lock, so that requests run ONE AT A TIME (transformers has no continuous
batching: concurrent clients queue behind the lock).

What it speaks (the subset bench_serve.py sends):
- `prompt`: a string or a list of token ids; `max_tokens` (default 16); greedy only (`temperature` 0 or absent);
- `ignore_eos` / `min_tokens` (vLLM's extras): passed as `min_new_tokens`, so that EOS cannot end a generation
  before `max_tokens` (ignore_eos) or `min_tokens`;
- `skip_special_tokens` (default true), `stream`, `stream_options.include_usage`;
- streaming answers are Server-Sent Events, `data: {json}` lines with real text chunks (one per new token
  whose text is complete), a last chunk carrying `finish_reason`, a usage chunk when asked, and
  `data: [DONE]`; a non-streaming answer is one JSON body. `usage.completion_tokens` counts the ids
  `generate` returned past the prompt.

Two choices that keep the comparison about the model and not about the plumbing:
- transformers' `TextIteratorStreamer` releases text only at spaces, newlines and CJK ideographs, so kana
  would pile up and the time to first chunk would measure the streamer. `TokenStreamer` below releases the
  new text after every token (holding back only an unfinished UTF-8 sequence), as `neoxja serve` does.
- A model whose vocabulary is padded past its tokenizer's (the 2.7B width has 32,000 rows; the bundled
  tokenizer has 8,000 ids) would otherwise produce ids the tokenizer cannot spell; those logits are masked,
  as `neoxja serve` masks them (its engine's vocab_limit).

    python benchmarks/serve_baseline.py --model DIR --port 0    # prints "listening on http://..." on stderr
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here
from fastapi.responses import JSONResponse, StreamingResponse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config, weights and tokenizer files)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0: any free port (printed on stderr)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return p


def make_token_streamer(tokenizer, skip_special_tokens: bool):
    """A TextIteratorStreamer that releases the new text after every token (see the module's docstring)."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value):
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False  # generate() hands over the prompt first
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return  # the first bytes of a character: wait for the rest
            new, self.print_len = text[self.print_len:], len(text)
            if new:
                self.on_finalized_text(new)

    return TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens)


def vocab_limit_processor(limit: int):
    """A logits processor that never lets ids >= `limit` (the tokenizer's size) be chosen."""
    from transformers import LogitsProcessor

    class VocabLimit(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, limit:] = -float("inf")
            return scores

    return VocabLimit()


class BadRequest(Exception):
    pass


def create_app(model_dir, dtype: torch.dtype = torch.float32):
    """The FastAPI app: the model and tokenizer load here, before the app exists (so /health is 200 as soon
    as the server listens). `app.state.model` and `app.state.tokenizer` are the loaded pair."""
    import transformers

    tokenizer = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(str(model_dir))
    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    name = str(model_dir).rstrip("/").rsplit("/", 1)[-1]
    padded = model.config.vocab_size > len(tokenizer)
    lock = threading.Lock()  # one generation at a time
    app = FastAPI()
    app.state.model, app.state.tokenizer = model, tokenizer

    def parse(body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise BadRequest("prompt must be a string or a list of token ids")
        if body.get("temperature") not in (None, 0, 0.0):
            raise BadRequest("this baseline is greedy only: temperature must be 0")
        max_tokens = int(body.get("max_tokens") or 16)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        return dict(ids=ids, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
                    skip_special_tokens=bool(body.get("skip_special_tokens", True)),
                    stream=bool(body.get("stream")),
                    include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def start_generation(req: dict):
        """Start generate() in a thread that waits for the lock; return (streamer, result dict, thread)."""
        streamer = make_token_streamer(tokenizer, req["skip_special_tokens"])
        result: dict = {}

        def work():
            try:
                with lock, torch.no_grad():
                    out = model.generate(
                        torch.tensor([req["ids"]]), attention_mask=torch.ones(1, len(req["ids"]), dtype=torch.long),
                        max_new_tokens=req["max_tokens"], min_new_tokens=req["min_tokens"], do_sample=False,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                        streamer=streamer, logits_processor=[vocab_limit_processor(len(tokenizer))] if padded else None)
                result["completion_tokens"] = out.shape[1] - len(req["ids"])
            except Exception as e:  # noqa: BLE001 -- reported to the client
                result["error"] = f"{type(e).__name__}: {e}"
                streamer.end()  # unblock the reader

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return streamer, result, thread

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = parse(await request.json())
        except (BadRequest, ValueError, TypeError) as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streamer, result, thread = start_generation(req)

        def usage() -> dict:
            n = result.get("completion_tokens", 0)
            return {"prompt_tokens": len(req["ids"]), "completion_tokens": n, "total_tokens": len(req["ids"]) + n}

        def finish_reason() -> str:
            return "length" if result.get("completion_tokens") == req["max_tokens"] else "stop"

        def chunk(choices: list, with_usage: bool = False) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}
            if req["include_usage"]:
                body["usage"] = usage() if with_usage else None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if not req["stream"]:
            text = "".join(await _in_thread(lambda: list(streamer)))
            await _in_thread(thread.join)
            if "error" in result:
                return JSONResponse({"error": {"message": result["error"], "type": "server_error"}}, status_code=500)
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason()}],
                    "usage": usage()}

        def events():  # a plain generator: Starlette runs each step in a worker thread (the streamer blocks)
            for text in streamer:
                if text:
                    yield chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])
            thread.join()
            if "error" in result:
                yield f"data: {json.dumps({'error': {'message': result['error'], 'type': 'server_error'}})}\n\n"
            else:
                yield chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason()}])
                if req["include_usage"]:
                    yield chunk([], with_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _in_thread(fn):
    import anyio

    return await anyio.to_thread.run_sync(fn)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from neoxja.serving.cli import announce_port  # the same "listening on" line as neoxja serve

    app = create_app(args.model, getattr(torch, args.dtype))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))

    announce_port(server, "serve_baseline")
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
