"""The parts of `neoxja serve`'s API that tests/test_serve.py does not assert, against live servers.

- /health is 503 while the model loads, then 200; meanwhile the API answers 503 with Retry-After;
- CORS: no CORS headers without --allowed-origins; with it, a preflight from that origin is answered (without an
  API key) and the responses carry the origin, and other origins get nothing;
- --served-model-name is the model's name in /v1/models, in responses and in the model check;
- a batch of prompts (token-id lists or strings) with n > 1 indexes its choices prompt by prompt;
- logprobs (and chat's top_logprobs) go up to 20; 21 is a 400;
- `user` changes nothing in the output;
- a too-long text prompt's message names the prompt's length and the context length;
- every error, whatever its status, has exactly OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from test_serve import MODEL, REPO, TEMPLATE, Server, free_port

NAME = "neko-small"  # --served-model-name
KEY = "k-secret"
ORIGIN = "http://app.example"
OTHER_ORIGIN = "http://evil.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """`r` is an error in exactly OpenAI's shape; return its inner object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def plain(bundled_dir):
    """The bundled model with the defaults: no CORS, no key, no chat template."""
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def configured(bundled_dir, tmp_path_factory):
    """A served name, one CORS origin, a key, a chat template, one slot and one queue place, a 4 kB body limit."""
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    s = Server("--served-model-name", NAME, "--allowed-origins", ORIGIN, "--api-key", KEY,
               "--chat-template", str(template), "--max-num-seqs", "1", "--max-queue", "1", "--max-body", "4096")
    yield s
    s.stop()


# ---- /health while loading ----

# `neoxja serve` whose model load waits for a line on stdin: the server listens while the load is held, so the
# loading state lasts exactly as long as the test wants (the gate is here, the server's code is unchanged)
GATED_SERVE = """
import sys
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer
load = GPTNeoXJapaneseTokenizer.from_pretrained.__func__
def gated(cls, *args, **kwargs):
    sys.stdin.readline()
    return load(cls, *args, **kwargs)
GPTNeoXJapaneseTokenizer.from_pretrained = classmethod(gated)
from neoxja.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def poll(url: str, deadline: float) -> httpx.Response:
    """The first answer from `url` (connection errors until the server listens)."""
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing listens at {url}"
            time.sleep(0.05)


def test_health_is_503_while_the_model_loads_then_200(bundled_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", GATED_SERVE, "--port", str(port)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        assert poll(url + "/health", deadline).status_code == 503  # listening, and the load is held
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "猫", "max_tokens": 1})
        assert_error(r, 503, code="loading")
        assert r.headers["retry-after"].isdigit()
        assert_error(httpx.get(url + "/v1/models"), 503, code="loading")
        assert httpx.get(url + "/version").status_code == 200  # these answer while loading
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/health").status_code == 503  # still held: the 503 is not a race lost

        proc.stdin.write("go\n")
        proc.stdin.flush()
        statuses = []
        while not statuses or statuses[-1] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (statuses, proc.poll())
            statuses.append(httpx.get(url + "/health").status_code)
            time.sleep(0.05)
        assert set(statuses[:-1]) <= {503}, statuses
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "猫", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


# ---- CORS ----

def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def cors_headers(r: httpx.Response) -> dict:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def test_no_cors_headers_by_default(plain):
    assert cors_headers(preflight(plain.url, ORIGIN)) == {}
    r = httpx.post(plain.url + "/v1/completions", headers={"Origin": ORIGIN},
                   json={"model": MODEL, "prompt": "猫", "max_tokens": 1})
    assert r.status_code == 200 and cors_headers(r) == {}


def test_cors_for_the_allowed_origin_only(configured):
    r = preflight(configured.url, ORIGIN)  # a browser's preflight carries no key
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(configured.url + "/v1/completions", headers={**AUTH, "Origin": ORIGIN},
                   json={"model": NAME, "prompt": "猫", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # a page from elsewhere learns nothing: its preflight fails and responses do not name it
    assert preflight(configured.url, OTHER_ORIGIN).headers.get("access-control-allow-origin") != OTHER_ORIGIN
    r = httpx.post(configured.url + "/v1/completions", headers={**AUTH, "Origin": OTHER_ORIGIN},
                   json={"model": NAME, "prompt": "猫", "max_tokens": 1})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---- the served name ----

def test_served_model_name(configured):
    c = configured.client(api_key=KEY)
    assert [m.id for m in c.models.list().data] == [NAME]
    r = c.completions.create(model=NAME, prompt="吾輩は", max_tokens=2)
    assert r.model == NAME and r.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match=NAME):  # the directory's name is not the served one
        c.completions.create(model=MODEL, prompt="吾輩は", max_tokens=2)
    r = httpx.post(configured.url + "/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "x"})
    assert NAME in assert_error(r, 404, code="model_not_found", param="model")["message"]


# ---- batches, logprobs, user ----

def test_a_batch_indexes_choices_prompt_by_prompt(plain):
    c = plain.client()
    prompts = ["吾輩は猫である。", "国境の長いトンネルを抜けると"]
    ids = [httpx.post(plain.url + "/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    greedy = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    alone = [c.completions.create(prompt=p, **greedy).choices[0].text for p in prompts]
    assert alone[0] != alone[1]  # else the order of the choices below could not be told
    for batch in (ids, prompts):  # a list of token-id lists, a list of strings
        r = c.completions.create(prompt=batch, n=2, **greedy)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        assert [ch.text for ch in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
        assert r.usage.prompt_tokens == 2 * (len(ids[0]) + len(ids[1])) and r.usage.completion_tokens == 4 * 5


def test_logprobs_up_to_20(plain, configured):
    c = plain.client()
    r = c.completions.create(model=MODEL, prompt="春は", max_tokens=3, logprobs=20)
    tops = r.choices[0].logprobs.top_logprobs
    assert len(tops) == 3 and all(1 <= len(top) <= 20 for top in tops)
    assert max(len(top) for top in tops) > 5  # more than a small default was returned
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model=MODEL, prompt="春は", max_tokens=3, logprobs=21)
    r = httpx.post(plain.url + "/v1/completions", json={"prompt": "春は", "max_tokens": 3, "logprobs": 21})
    assert_error(r, 400, param="logprobs")

    chat = configured.client(api_key=KEY)
    messages = [{"role": "user", "content": "こんにちは"}]
    r = chat.chat.completions.create(model=NAME, messages=messages, max_tokens=3, logprobs=True, top_logprobs=20)
    assert all(len(t.top_logprobs) == 20 for t in r.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        chat.chat.completions.create(model=NAME, messages=messages, max_tokens=3, logprobs=True, top_logprobs=21)


def test_user_changes_nothing(plain):
    c = plain.client()
    kw = dict(model=MODEL, prompt="吾輩は", max_tokens=8, temperature=1.0, seed=11)
    assert c.completions.create(user="alice", **kw).choices[0].text == c.completions.create(**kw).choices[0].text


# ---- errors ----

def test_a_too_long_text_prompt_names_both_lengths(plain):
    prompt = "吾輩は猫である。" * 80
    n = httpx.post(plain.url + "/tokenize", json={"prompt": prompt}).json()["count"]
    max_len = plain.client().models.list().data[0].model_extra["max_model_len"]
    assert n > max_len
    r = httpx.post(plain.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
    message = assert_error(r, 400, code="context_length_exceeded")["message"]
    assert f"{max_len} tokens" in message and f"{n} in the prompt" in message, message
    plain.alive()


def test_every_error_has_openais_shape(plain, configured):
    url = plain.url
    assert_error(httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404,
                 code="model_not_found", param="model")
    assert_error(httpx.post(url + "/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404, code="model_not_found")
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url + "/v1/completions"), 405)
    assert_error(httpx.post(url + "/v1/completions", content=b"{", headers={"content-type": "application/json"}),
                 400, code="invalid_json")
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, param="suffix")
    assert_error(httpx.post(url + "/v1/completions", json={"max_tokens": 1}), 400, param="prompt")
    assert_error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                 400, code="no_chat_template", param="messages")

    url = configured.url
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x"})
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "猫" * 3000}), 413,
                 code="request_too_large")
    # one slot and one queue place: a request for three choices can never fit
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": NAME, "prompt": "猫", "n": 3})
    assert_error(r, 429, code="queue_full")
    assert r.headers["retry-after"].isdigit()
    configured.alive()


def test_the_documented_differences_from_openai_and_vllm(plain, configured):
    """docs/serving.md, "Differences from OpenAI/vLLM": each is a 400 that names the parameter."""
    url = plain.url + "/v1/completions"
    r = httpx.post(url, json={"prompt": "猫", "max_tokens": 2, "temprature": 0.5})  # a typo: vLLM would ignore it
    assert "temprature" in assert_error(r, 400, param="temprature")["message"]
    assert_error(httpx.post(url, json={"prompt": "猫", "logit_bias": {"5": 1.0}}), 400, param="logit_bias")
    assert_error(httpx.post(url, json={"prompt": "猫", "echo": True, "logprobs": 1}), 400, param="echo")
    assert_error(httpx.post(url, json={"prompt": "猫", "suffix": "。"}), 400, param="suffix")
    assert_error(httpx.post(url, json={"prompt": "猫", "temperature": 2.5}), 400, param="temperature")  # OpenAI's [0, 2]
    chat = configured.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "こんにちは"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert_error(httpx.post(chat, headers=AUTH, json={"model": NAME, "messages": messages, "tools": tools}), 400,
                 param="tools")
    assert_error(httpx.post(chat, headers=AUTH, json={"model": NAME, "messages": messages,
                                                       "response_format": {"type": "json_object"}}),
                 400, param="response_format")
    assert httpx.get(plain.url + "/health").status_code == 200  # and the server keeps serving
