"""benchmarks/bench_serve.py and benchmarks/serve_baseline.py: the metric arithmetic on synthetic chunk
timestamps (values worked out by hand), the client's SSE parsing, that the baseline streams exactly what
transformers' generate returns, and one `--quick` run end to end (no speed thresholds)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # defines functions and constants only
    return module


bench = load("bench_serve")


# -- metrics (vLLM's definitions) ---------------------------------------------------------------------

def test_request_metrics_by_hand():
    # sent at 10.0 s; text chunks at 10.25, 10.5, 11.0, 11.75; the server counted 4 tokens
    m = bench.request_metrics(10.0, [10.25, 10.5, 11.0, 11.75], 4)
    assert m["ttft"] == 0.25  # first non-empty chunk - send
    assert m["itl"] == [0.25, 0.5, 0.75]  # gaps between chunks
    assert m["e2el"] == 1.75  # last chunk - send
    assert m["tpot"] == 0.5  # (1.75 - 0.25) / (4 - 1)


def test_tpot_counts_tokens_not_chunks():
    # 6 tokens arrived in 4 chunks (a chunk may carry several tokens): ITL has 3 gaps, TPOT divides by 5
    m = bench.request_metrics(0.0, [0.5, 1.0, 1.5, 2.5], 6)
    assert m["itl"] == [0.5, 0.5, 1.0]
    assert m["tpot"] == pytest.approx((2.5 - 0.5) / 5)
    one = bench.request_metrics(0.0, [0.75], 1)
    assert (one["ttft"], one["e2el"], one["itl"], one["tpot"]) == (0.75, 0.75, [], None)  # no TPOT for one token
    with pytest.raises(ValueError):
        bench.request_metrics(0.0, [], 3)


def test_summarize_throughputs_and_percentiles():
    R = bench.RequestRecord
    records = [R(send_time=0.0, chunk_times=[0.25, 0.5, 1.0, 1.75], output_tokens=4),  # ttft .25, tpot .5
               R(send_time=1.0, chunk_times=[1.75, 2.0, 2.25], output_tokens=4),  # ttft .75, tpot (1.25-.75)/3
               R(send_time=0.5, error="HTTP 500")]  # failed: counted as a request, not as completed
    s = bench.summarize(records, duration=4.0)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["request_throughput"] == 2 / 4.0
    assert s["output_throughput"] == 8 / 4.0
    assert s["output_tokens"] == 8 and s["output_tokens_per_request"] == [4]
    assert s["ttft_p50_ms"] == pytest.approx(500.0)  # halfway between 250 and 750
    assert s["ttft_p99_ms"] == pytest.approx(250 + 0.99 * 500)
    assert s["tpot_p50_ms"] == pytest.approx((500 + 500 / 3) / 2)
    # ITLs of both requests pooled: 250, 500, 750, 250, 250 -> median 250
    assert s["itl_p50_ms"] == pytest.approx(250.0)
    assert s["e2el_p50_ms"] == pytest.approx((1750 + 1250) / 2)


def test_percentile_is_linear_interpolation():
    xs = [7.0, 1.0, 4.0, 10.0, 2.5]
    cuts = statistics.quantiles(xs, n=4, method="inclusive")
    assert [bench.percentile(xs, q) for q in (25, 50, 75)] == pytest.approx(cuts)
    assert (bench.percentile(xs, 0), bench.percentile(xs, 100)) == (1.0, 10.0)


def test_client_times_text_chunks_and_reads_usage():
    """Empty-text chunks (the finish chunk, the usage chunk) are not timed; usage gives the token count."""
    def chunk(**body):
        return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

    sse = (chunk(choices=[{"index": 0, "text": "吾輩"}], usage=None) + ": a comment\n\n"
           + chunk(choices=[{"index": 0, "text": "は"}], usage=None)
           + chunk(choices=[{"index": 0, "text": "", "finish_reason": "length"}], usage=None)
           + chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
           + "data: [DONE]\n\n")
    sent = []

    async def handler(request):
        sent.append(await request.json())
        return web.Response(body=sse.encode(), content_type="text/event-stream")

    async def refuse(request):
        return web.json_response({"error": {"message": "queue full"}}, status=429)

    async def go(respond, prompt, max_tokens):
        app = web.Application()
        app.router.add_post("/v1/completions", respond)
        async with TestServer(app, host="127.0.0.1") as server, bench.client_session() as session:
            return await bench.stream_completion(session, str(server.make_url("")).rstrip("/"), prompt, max_tokens)

    r = asyncio.run(go(handler, [1, 2, 3], 3))
    assert r.ok and r.text == "吾輩は" and len(r.chunk_times) == 2 and r.output_tokens == 3
    assert r.chunk_times[0] >= r.send_time
    body = sent[0]
    assert body["stream"] and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
    assert (body["prompt"], body["max_tokens"], body["temperature"]) == ([1, 2, 3], 3, 0)

    r = asyncio.run(go(refuse, [1], 2))
    assert not r.ok and r.error.startswith("HTTP 429")


# -- the baseline server --------------------------------------------------------------------------------

def test_baseline_streams_what_generate_returns(bundled_dir):
    import transformers
    from fastapi.testclient import TestClient

    baseline = load("serve_baseline")
    app = baseline.create_app(bundled_dir)
    # the oracle: the same checkpoint loaded afresh, greedy generate, decode of the new ids
    tokenizer = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(str(bundled_dir))
    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(str(bundled_dir), dtype="float32").eval()
    n = 12
    # "春は" starts its continuation with a text token; after "。" the model first emits tokens without text
    for prompt in ("春は", "吾輩は猫である。名前はまだ無い。"):
        with TestClient(app) as client:
            with client.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": n, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert sum(1 for t in texts if t) > 1  # streamed in pieces, not in one body
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == n
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"

        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == n
        assert "".join(texts) == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), prompt


# -- end to end ---------------------------------------------------------------------------------------------

def test_quick_run_end_to_end(tmp_path, bundled_dir):
    # one torch thread per process: on a shared 2-core machine, a second thread that other jobs deschedule
    # makes every op wait for it (the run is ~4x slower), and this test checks plumbing, not speed
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_serve.py"), "--quick", "--skip-checks",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU flags: amx_bf16=" in proc.stdout and "threads" in proc.stdout
    result = json.loads(out.read_text())["models"]["small"]
    n = result["max_tokens"]
    sides = result["sides"]
    assert set(sides) >= {"neoxja", "baseline"}
    assert set(sides["neoxja"]) == set(sides["baseline"]) == {"c1", "c16"}
    for load in ("c1", "c16"):
        a, b = sides["neoxja"][load], sides["baseline"][load]
        for s in (a, b):
            assert s["completed"] == s["requests"] > 0 and s["failed"] == 0
            assert s["output_tokens_per_request"] == [n]  # ignore_eos: exactly max_tokens each
            for key in ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                        "tpot_p99_ms", "itl_p50_ms", "e2el_p50_ms"):
                assert s[key] > 0, (load, key, s)
        assert a["output_tokens"] == b["output_tokens"] == a["requests"] * n
    assert result["ttft_idle"]["server_ms"] > 0 and result["ttft_idle"]["direct_ms"] > 0
    assert len(result["goals"]) == 3 and result["same_work"]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
