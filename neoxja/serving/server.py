"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over the AsyncEngine.

Endpoints: POST /v1/completions, /v1/chat/completions, /v1/chat/render, /tokenize, /detokenize;
GET /v1/models, /health, /metrics, /version. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}; streaming is Server-Sent Events in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from neoxja.serving.async_engine import AsyncEngine, QueueFull
from neoxja.serving.engine import RequestRefused
from neoxja.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest)
from neoxja.sampling import ParamError, SamplingParams

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerState:
    model_name: str
    max_body: int = 2 * 1024 * 1024
    api_keys: list[str] = field(default_factory=list)
    chat_template: Any = None  # a jinja2 Template, or None
    engine: AsyncEngine | None = None  # None while loading
    tokenizer: Any = None
    metrics: Any = None
    max_model_len: int = 0
    draining: bool = False
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


# ---- errors ----

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _api_error(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


class Gate:
    """Pure ASGI middleware: 503 while loading or draining, 401 without a valid key, 413 over max_body."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        if path != "/health":
            if state.draining:
                return await error_response(503, "the server is shutting down", "service_unavailable",
                                            code="shutting_down")(scope, receive, send)
            if state.engine is None and path not in ("/version", "/metrics"):
                return await error_response(503, "the model is loading; retry shortly", "service_unavailable",
                                            code="loading", headers={"Retry-After": "1"})(scope, receive, send)
        if state.api_keys and path.startswith(PROTECTED) and scope["method"] != "OPTIONS":
            if not _authorized(dict(scope["headers"]).get(b"authorization", b""), state.api_keys):
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > state.max_body:
            return await self._too_large(scope, receive, send)
        # read the body here, up to the limit, then hand it on: one message, as a small body comes
        chunks, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > state.max_body:
                    return await self._too_large(scope, receive, send)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"the request body is larger than --max-body={self.state.max_body} bytes",
                             code="request_too_large")(scope, receive, send)


def _authorized(header: bytes, keys: list[str]) -> bool:
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    ok = False
    for key in keys:  # every key is compared, in constant time each
        ok |= hmac.compare_digest(token.strip().encode(), key.encode())
    return ok


# ---- the app ----

def create_app(state: ServerState, allowed_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="neoxja", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _on_api_error(request, e: APIError):
        return _api_error(e)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON in the request body: {first.get('ctx', {}).get('error', '')}"
                                  .rstrip(": "), code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
                            for err in errors[:5])
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request, e: StarletteHTTPException):
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), type_)

    @app.exception_handler(Exception)
    async def _on_error(request, e: Exception):  # a bug: a 500 in the API's shape, and the server goes on
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        if state.load_error:
            return error_response(500, f"the model failed to load: {state.load_error}", "server_error")
        if state.engine is None or state.draining:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        from neoxja import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "neoxja", "root": state.model_name, "parent": None,
                                            "max_model_len": state.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else _render_chat(state, body.messages,
                                                                        body.add_generation_prompt)
        ids = _encode(state, text)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        _check_ids(state, body.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/render")
    async def chat_render(body: ChatCompletionRequest):
        _check_model(state, body.model)
        prompt = _render_chat(state, body.messages, body.add_generation_prompt)
        return {"prompt": prompt, "prompt_token_ids": _encode(state, prompt)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(state, body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported: this model only continues a prompt", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of must equal n ({body.n}) or be left out; got {body.best_of}", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        prompts = _prompts(state, body.prompt)
        params = _sampling_params(body, body.max_tokens, body.logprobs)
        for ids in prompts:
            _check_context(state, ids, params.max_tokens)
        _check_capacity(state, len(prompts) * body.n)
        texts = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        job = _Job(state, "cmpl", "text_completion", prompts, params, body.n, texts,
                   return_token_ids=body.return_token_ids or body.return_tokens)
        if body.stream:
            return _stream(job, request, body.stream_options)
        return await _until_disconnect(request, job.complete())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_common(state, body)
        if body.tools or (body.tool_choice not in (None, "none")):
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = _render_chat(state, body.messages, body.add_generation_prompt)
        ids = _encode(state, prompt)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling_params(body, max_tokens, logprobs)
        _check_context(state, ids, params.max_tokens)
        _check_capacity(state, body.n)
        job = _Job(state, "chatcmpl", "chat.completion", [ids], params, body.n, [""])
        if body.stream:
            return _stream(job, request, body.stream_options)
        return await _until_disconnect(request, job.complete())

    app.add_middleware(_GateMiddleware, state=state)
    if allowed_origins:  # outside the gate: a CORS preflight is answered without a key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


class _GateMiddleware(Gate):
    def __init__(self, app, state):
        super().__init__(app, state)


# ---- request helpers ----

def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist. This server serves `{state.model_name}`.",
                       param="model", code="model_not_found")


def _check_common(state: ServerState, body) -> None:
    _check_model(state, body.model)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _sampling_params(body, max_tokens, logprobs) -> SamplingParams:
    stop = body.stop if body.stop is not None else []
    if body.temperature is not None and not 0 <= body.temperature <= 2:  # OpenAI's range
        raise APIError(400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_tokens=body.min_tokens,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, seed=body.seed,
            logprobs=logprobs, skip_special_tokens=body.skip_special_tokens)
    except ParamError as e:
        raise APIError(400, str(e), param=e.param) from None


def _encode(state: ServerState, text: str) -> list[int]:
    try:
        return list(state.tokenizer.encode(text))
    except ValueError as e:  # a lone surrogate
        raise APIError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None


def _check_ids(state: ServerState, ids: list[int], param: str) -> None:
    V = len(state.tokenizer)
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {V})", param=param)


def _prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [_encode(state, prompt)]
    if not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [_encode(state, p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        _check_ids(state, prompt, "prompt")
        return [list(prompt)]
    for p in prompt:
        _check_ids(state, p, "prompt")
    return [list(p) for p in prompt]


def _check_context(state: ServerState, ids: list[int], max_tokens: int | None) -> None:
    try:
        state.engine.check_prompt(ids, max_tokens)
    except RequestRefused as e:
        raise APIError(400, str(e), param="max_tokens" if max_tokens else "prompt",
                       code="context_length_exceeded") from None


def _check_capacity(state: ServerState, count: int) -> None:
    engine = state.engine
    if engine.num_unfinished + count > engine.engine.max_num_seqs + engine.max_queue:
        raise APIError(429, f"the server is busy: every slot is taken and the waiting queue is full "
                            f"(--max-queue {engine.max_queue}); retry later", "rate_limit_exceeded",
                       code="queue_full", headers={"Retry-After": "1"})


def _render_chat(state: ServerState, messages, add_generation_prompt: bool) -> str:
    if state.chat_template is None:
        raise APIError(400, "this is a base model without a chat template, so chat messages cannot be turned into a "
                            "prompt: start the server with --chat-template FILE (a Jinja2 template over `messages`, "
                            "as in transformers), or use /v1/completions with a prompt", param="messages",
                       code="no_chat_template")
    try:
        return state.chat_template.render(messages=[m.model_dump(exclude_none=True) for m in messages],
                                          add_generation_prompt=add_generation_prompt,
                                          bos_token=state.tokenizer.bos_token, eos_token=state.tokenizer.eos_token)
    except Exception as e:  # the template raised (jinja2's raise_exception, a type error in it, ...)
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None


async def _until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its requests are aborted, slots freed)."""
    work = asyncio.ensure_future(coro)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    return Response(status_code=499)  # nobody reads it


# ---- one request's choices ----

_BYTE_TOKEN = re.compile(r"<\|byte(\d+)\|>")


class _Job:
    """The n choices of each prompt of one request, run on the engine; as one response or as SSE chunks."""

    def __init__(self, state: ServerState, id_prefix: str, object_: str, prompts: list[list[int]],
                 params: SamplingParams, n: int, echo_texts: list[str], return_token_ids: bool = False):
        self.state = state
        self.return_token_ids = return_token_ids  # each choice carries prompt_token_ids and token_ids (vLLM)
        self.chat = object_ == "chat.completion"
        self.object = object_
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        self.params = params
        self.n = n
        self.echo_texts = echo_texts
        self.prompt_tokens = sum(max(len(p), 1) for p in prompts) * 1
        self.completion_tokens = 0

    def _choice_params(self, i: int) -> SamplingParams:
        import dataclasses

        params = dataclasses.replace(self.params, stop=list(self.params.stop),
                                     stop_token_ids=list(self.params.stop_token_ids))
        if params.seed is not None:
            params.seed = params.seed + i  # choice i of n draws with seed + i: distinct, reproducible
        return params

    async def _run_choice(self, index: int, prompt: list[int], sink):
        params = self._choice_params(index % self.n)
        try:
            async for out in self.state.engine.generate(prompt, params):
                await sink(index, out)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"})
        except RequestRefused as e:
            raise APIError(400, str(e), param="prompt")

    def _choices(self):
        for p, prompt in enumerate(self.prompts):
            for i in range(self.n):
                yield p * self.n + i, p, prompt

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens * self.n, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens * self.n + self.completion_tokens}

    # -- logprobs formats --

    def token_repr(self, token_id: int) -> tuple[str, list[int]]:
        tok = self.state.tokenizer
        spelling = tok.convert_ids_to_tokens(token_id)
        byte = _BYTE_TOKEN.fullmatch(spelling or "")
        if byte:
            b = int(byte.group(1))
            return f"bytes:\\x{b:02x}", [b]
        text = tok.decode([token_id])
        return text, list(text.encode("utf-8"))

    def logprobs_json(self, entries, text_offset_start: int = 0):
        if entries is None:
            return None
        if self.chat:
            content = []
            for e in entries:
                token, data = self.token_repr(e.token_id)
                top = []
                for t, lp in e.top:
                    s, b = self.token_repr(t)
                    top.append({"token": s, "logprob": lp, "bytes": b})
                content.append({"token": token, "logprob": e.logprob, "bytes": data, "top_logprobs": top})
            return {"content": content}
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset_start
        for e in entries:
            token, _ = self.token_repr(e.token_id)
            tokens.append(token)
            token_logprobs.append(e.logprob)
            top_logprobs.append({self.token_repr(t)[0]: lp for t, lp in e.top} if self.params.logprobs else None)
            offsets.append(offset)
            offset += len(self.state.tokenizer.decode([e.token_id]))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    # -- one response --

    async def complete(self) -> dict:
        results: dict[int, dict] = {}
        async def sink(index, out):
            r = results.setdefault(index, {"text": "", "logprobs": [], "finish": None, "count": 0, "ids": []})
            r["text"] += out.text
            r["ids"] += out.token_ids
            if out.logprobs:
                r["logprobs"].extend(out.logprobs)
            r["count"] = out.num_generated_tokens
            if out.finish_reason is not None:
                r["finish"] = out.finish_reason

        tasks = [asyncio.ensure_future(self._run_choice(index, prompt, sink)) for index, _, prompt in self._choices()]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        choices = []
        for index, p, _ in self._choices():
            r = results.get(index, {"text": "", "logprobs": [], "finish": "abort", "count": 0})
            if r["finish"] == "abort":
                raise APIError(503, "the request was aborted (the server is shutting down or failed)",
                               "service_unavailable")
            self.completion_tokens += r["count"]
            text = self.echo_texts[p] + r["text"]
            lp = self.logprobs_json(r["logprobs"], len(self.echo_texts[p])) if self.params.logprobs is not None else None
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": r["finish"]})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": r["finish"]})
            if self.return_token_ids:
                choices[-1].update(prompt_token_ids=self.prompts[p], token_ids=r["ids"])
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self.usage()}

    # -- SSE chunks --

    def chunk(self, choices: list[dict], usage=False, include_usage=False) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.state.model_name, "choices": choices}
        if include_usage:
            body["usage"] = self.usage() if usage else None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice_delta(self, index: int, text: str, logprobs, finish, first: bool, token_ids=None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids  # the ids generated since the previous chunk of this choice
        return choice


def _stream(job: _Job, request: Request, stream_options) -> StreamingResponse:
    include_usage = bool(stream_options and stream_options.include_usage)

    async def events():
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def sink(index, out):
            await queue.put((index, out))

        async def run(index, prompt):
            try:
                await job._run_choice(index, prompt, sink)
            except APIError as e:
                await queue.put((index, e))
            finally:
                await queue.put((index, done))

        tasks = [asyncio.ensure_future(run(index, prompt)) for index, _, prompt in job._choices()]
        try:
            started = set()
            # with echo, the prompt text opens each choice (chat: the assistant role opens it)
            for index, p, _ in job._choices():
                if job.chat or job.echo_texts[p]:
                    started.add(index)
                    yield job.chunk([job.choice_delta(index, job.echo_texts[p], None, None, True)],
                                    include_usage=include_usage)
            remaining = len(tasks)
            counts: dict[int, int] = {}
            offsets: dict[int, int] = {}
            held_ids: dict[int, list[int]] = {}  # return_token_ids: ids whose text is still held back
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, APIError):
                    err = {"error": {"message": item.message, "type": item.type, "param": item.param,
                                     "code": item.code}}
                    yield f"data: {json.dumps(err, ensure_ascii=False)}\n\n"
                    continue
                out = item
                counts[index] = out.num_generated_tokens
                if out.finish_reason == "abort":
                    err = {"error": {"message": "the request was aborted (the server is shutting down or failed)",
                                     "type": "service_unavailable", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                lp = None
                if job.params.logprobs is not None and out.logprobs:
                    lp = job.logprobs_json(out.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(out.text)
                if job.return_token_ids:
                    held_ids.setdefault(index, []).extend(out.token_ids)
                if not out.text and lp is None and out.finish_reason is None:
                    continue  # held-back text: nothing to send yet
                ids = held_ids.pop(index) if job.return_token_ids else None
                yield job.chunk([job.choice_delta(index, out.text, lp, out.finish_reason, index not in started, ids)],
                                include_usage=include_usage)
                started.add(index)
            job.completion_tokens = sum(counts.values())
            if include_usage:
                yield job.chunk([], usage=True, include_usage=True)
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()  # a client that left: every choice's request is aborted

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
