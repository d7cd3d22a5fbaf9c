"""A bounded load test of `neoxja serve` over loopback: many concurrent clients, random requests, some of them
abandoned mid-stream.

What it measures, after the whole run:
- no response is a 5xx (every request is valid, and the queue is larger than the run: every one is a 200);
- every response is well-formed: a non-streamed one is a JSON completion whose choices and usage agree; a streamed
  one is `data: {json}` chunks with exactly one finish_reason per choice, closed by `data: [DONE]`, whose usage
  (when asked for) agrees with the text and logprobs that came;
- greedy requests give the same text whether streamed or not and whatever shared their batch (the server makes
  its products batch-invariant), so the load does not leak one request's state into another's output;
- no slot leaks: /metrics' running and waiting gauges return to 0, and the success counter agrees with the
  choices that were completed (abandoned ones may or may not count, nothing else);
- the server's resident memory stays flat after a warm-up batch: per-request state that is never freed would
  show over hundreds of requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from test_serve import MODEL, Server, wait_idle

SENTENCES = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "国境の長いトンネルを抜けると雪国であった。夜の底が白くなった。",
    "春はあけぼの。やうやう白くなりゆく山ぎは、"
    "すこしあかりて、紫だちたる雲のほそくたなびきたる。",
    "メロスは激怒した。必ず、かの邪智暴虐の王を除かなければならぬと決意した。",
    "山路を登りながら、こう考えた。智に働けば角が立つ。情に棹させば流される。",
]
STOP_PIECES = ["。", "、", "の", "は", "に", "た", "ない"]

SEED = 20261202
N_CLIENTS = 36  # concurrent connections
N_WARMUP = 48  # requests before the first RSS reading
N_REQUESTS = 520  # requests after it
ABANDON_RATE = 0.10  # streamed requests whose client leaves after the first chunk
RSS_GROWTH_LIMIT_MIB = 64


@dataclass
class Planned:
    body: dict
    abandon: bool = False
    greedy_key: tuple | None = None  # requests with equal keys must give equal text


def random_slice(rng: random.Random) -> str:
    sentence = rng.choice(SENTENCES)
    start = rng.randrange(len(sentence) - 1)
    return sentence[start:rng.randint(start + 1, min(len(sentence), start + 24))]


def plan_requests(rng: random.Random, count: int, greedy_prompts: list[str]) -> list[Planned]:
    """`count` random valid completion requests; about ABANDON_RATE of them are abandoned mid-stream."""
    plans = []
    for _ in range(count):
        body = {"model": MODEL, "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.5}
        if rng.random() < ABANDON_RATE:  # long enough that the client leaves while it is generating
            body.update(prompt=random_slice(rng), max_tokens=48, ignore_eos=True, stream=True, temperature=0.9)
            plans.append(Planned(body, abandon=True))
            continue
        greedy = rng.random() < 0.3
        # greedy requests draw from a few prompts and lengths, so that equal ones recur under varying load
        body["prompt"] = rng.choice(greedy_prompts) if greedy else random_slice(rng)
        body["max_tokens"] = rng.choice([3, 7, 12]) if greedy else rng.randint(1, 12)
        body["temperature"] = 0 if greedy else round(rng.uniform(0.7, 1.2), 2)
        if rng.random() < 0.5:
            body["top_p"] = round(rng.uniform(0.5, 1.0), 2)
        if rng.random() < 0.5:
            body["top_k"] = rng.randint(1, 40)
        if rng.random() < 0.4:
            body["stop"] = ["。"] if greedy else rng.sample(STOP_PIECES, rng.randint(1, 2))
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
        if body["stream"] and rng.random() < 0.6:
            body["stream_options"] = {"include_usage": True}
        key = (body["prompt"], body["max_tokens"], tuple(sorted(body.get("stop", [])))) if greedy else None
        plans.append(Planned(body, greedy_key=key))
    return plans


# ---- checking one response ----

def check_choice_text(text: str, body: dict) -> None:
    assert isinstance(text, str)
    for s in body.get("stop", []):
        assert s not in text, (s, text)


def check_usage(usage: dict, body: dict, n_prompt: int) -> None:
    n, max_tokens = body["n"], body["max_tokens"]
    assert usage["prompt_tokens"] == n * n_prompt, (usage, body)
    assert n <= usage["completion_tokens"] <= n * max_tokens, (usage, body)  # each choice made >= 1 token
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_logprobs(lp: dict, body: dict) -> int:
    """The completion logprobs of one choice are aligned lists; return how many tokens they cover."""
    k = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == k
    assert all(x <= 0 for x in lp["token_logprobs"])
    for top in lp["top_logprobs"]:  # logprobs=0: the chosen tokens' only
        assert (not top) if body["logprobs"] == 0 else 1 <= len(top) <= body["logprobs"], (top, body)
    return k


def check_non_stream(response: dict, body: dict, n_prompt: int) -> list[tuple[str, int | None]]:
    """A JSON completion: n choices in order, each finished, usage consistent; return (text, tokens) per choice."""
    assert response["object"] == "text_completion" and response["model"] == MODEL
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(body["n"]))
    check_usage(response["usage"], body, n_prompt)
    lengths = []
    for c in choices:
        check_choice_text(c["text"], body)
        assert c["finish_reason"] in ("stop", "length"), c
        if "logprobs" in body:
            lengths.append(check_logprobs(c["logprobs"], body))
        else:
            assert c["logprobs"] is None
    if all(c["finish_reason"] == "length" for c in choices):
        assert response["usage"]["completion_tokens"] == body["n"] * body["max_tokens"]
    if lengths:
        assert sum(lengths) == response["usage"]["completion_tokens"], (lengths, response["usage"])
    per_choice = response["usage"]["completion_tokens"] if body["n"] == 1 else None
    return [(c["text"], per_choice) for c in choices]


def check_stream(raw: str, body: dict, n_prompt: int) -> list[tuple[str, int | None]]:
    """SSE: `data: {json}` events, one finish_reason per choice and nothing after it, then `data: [DONE]`."""
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    events = events[:-2]
    assert events and all(e.startswith("data: {") and "\n" not in e for e in events), raw[:400]
    chunks = [json.loads(e[len("data: "):]) for e in events]
    assert all("error" not in c for c in chunks), raw
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    include_usage = bool(body.get("stream_options", {}).get("include_usage"))
    if include_usage:  # every chunk has a usage field: null, except in the last one, which has no choices
        assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
        usage = chunks[-1]["usage"]
        check_usage(usage, body, n_prompt)
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c for c in chunks)
    texts, finishes, lengths = defaultdict(str), defaultdict(list), defaultdict(int)
    for chunk in chunks:
        assert len(chunk["choices"]) == 1
        c = chunk["choices"][0]
        assert not finishes[c["index"]], f"choice {c['index']} went on after its finish_reason"
        texts[c["index"]] += c["text"]
        if c["finish_reason"] is not None:
            assert c["finish_reason"] in ("stop", "length"), c
            finishes[c["index"]].append(c["finish_reason"])
        if c["logprobs"] is not None:
            lengths[c["index"]] += check_logprobs(c["logprobs"], body)
    assert sorted(texts) == list(range(body["n"])), sorted(texts)
    assert all(len(finishes[i]) == 1 for i in texts), dict(finishes)
    for text in texts.values():
        check_choice_text(text, body)
    per_choice = None
    if include_usage:
        if all(finishes[i] == ["length"] for i in texts):
            assert usage["completion_tokens"] == body["n"] * body["max_tokens"]
        if "logprobs" in body:
            assert sum(lengths.values()) == usage["completion_tokens"], (dict(lengths), usage)
        if body["n"] == 1:
            per_choice = usage["completion_tokens"]
    return [(texts[i], per_choice) for i in range(body["n"])]


# ---- the run ----

@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    completed_choices: int = 0
    abandoned_choices: int = 0
    greedy: defaultdict = field(default_factory=lambda: defaultdict(list))  # greedy key -> (text, tokens)s


async def send(client: httpx.AsyncClient, url: str, plan: Planned, n_prompt: int, tally: Tally) -> None:
    body = plan.body
    if plan.abandon:
        async with client.stream("POST", url, json=body) as r:
            tally.statuses[r.status_code] += 1
            async for line in r.aiter_lines():
                if line:
                    assert line.startswith("data: {"), line
                    break
        # leaving the block closes the connection with the body unread: the server sees a disconnect
        tally.abandoned_choices += body["n"]
        return
    if body["stream"]:
        async with client.stream("POST", url, json=body) as r:
            raw = (await r.aread()).decode()
        tally.statuses[r.status_code] += 1
        assert r.status_code == 200, raw
        assert r.headers["content-type"].startswith("text/event-stream")
        choices = check_stream(raw, body, n_prompt)
    else:
        r = await client.post(url, json=body)
        tally.statuses[r.status_code] += 1
        assert r.status_code == 200, r.text
        choices = check_non_stream(r.json(), body, n_prompt)
    tally.completed_choices += body["n"]
    if plan.greedy_key is not None:
        tally.greedy[plan.greedy_key].extend(choices)


async def run_clients(url: str, plans: list[Planned], prompt_tokens: dict[str, int], tally: Tally) -> None:
    """N_CLIENTS workers, each sending the next planned request as soon as its previous one is done."""
    pending = iter(plans)
    limits = httpx.Limits(max_connections=N_CLIENTS + 4, max_keepalive_connections=N_CLIENTS + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300)) as client:
        async def worker():
            for plan in pending:
                await send(client, url + "/v1/completions", plan, prompt_tokens[plan.body["prompt"]], tally)

        await asyncio.gather(*(worker() for _ in range(N_CLIENTS)))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20  # psutil: a declared test dependency


def success_count(server: Server) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("neoxja:request_success_total{"))


@pytest.fixture(scope="module")
def server(bundled_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # tiny products: a second thread only contends with the clients
        s = Server("--max-num-seqs", "8", "--max-queue", "600")
    yield s
    s.stop()


def test_load_many_clients_random_requests_and_disconnects(server, bundled_dir):
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    rng = random.Random(SEED)
    greedy_prompts = [random_slice(rng) for _ in range(6)]
    warmup = plan_requests(rng, N_WARMUP, greedy_prompts)
    plans = plan_requests(rng, N_REQUESTS, greedy_prompts)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    prompt_tokens = {p.body["prompt"]: len(tokenizer.encode(p.body["prompt"])) for p in warmup + plans}

    tally = Tally()
    asyncio.run(run_clients(server.url, warmup, prompt_tokens, tally))
    wait_idle(server)
    rss_before = rss_mib(server.proc.pid)
    successes_before, completed_before, abandoned_before = (success_count(server), tally.completed_choices,
                                                            tally.abandoned_choices)

    started = time.monotonic()
    asyncio.run(run_clients(server.url, plans, prompt_tokens, tally))
    seconds = time.monotonic() - started
    wait_idle(server)  # every slot and queue place is given back, the abandoned requests' included
    rss_after = rss_mib(server.proc.pid)
    successes = success_count(server) - successes_before
    completed = tally.completed_choices - completed_before
    abandoned = tally.abandoned_choices - abandoned_before

    print(f"\nload: {N_REQUESTS} requests ({sum(p.abandon for p in plans)} abandoned mid-stream) from {N_CLIENTS} "
          f"clients in {seconds:.1f} s after {N_WARMUP} warm-up ones; statuses {dict(tally.statuses)}; "
          f"server RSS {rss_before:.1f} MiB after warm-up, {rss_after:.1f} MiB at the end "
          f"({rss_after - rss_before:+.1f} MiB); {successes:.0f} choices counted as successes of {completed} "
          f"completed and {abandoned} abandoned; {len(tally.greedy)} greedy groups")
    assert sum(p.abandon for p in plans) >= 0.05 * N_REQUESTS
    assert set(tally.statuses) == {200}, tally.statuses  # no 5xx, and nothing refused either
    assert sum(tally.statuses.values()) == N_WARMUP + N_REQUESTS
    assert completed <= successes <= completed + abandoned, (completed, successes, abandoned)
    for key, choices in tally.greedy.items():
        assert len({text for text, _ in choices}) == 1, (key, choices)
        assert len({tokens for _, tokens in choices if tokens is not None}) <= 1, (key, choices)
    assert sum(len(c) > 1 for c in tally.greedy.values()) >= 5  # the comparison above was not vacuous
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB, (rss_before, rss_after)
    server.alive()
