"""neoxja.engines: the client side of driving an engine with neoxja's token ids, and exports without transformers.

`complete` is driven against a small OpenAI-style /v1/completions server in this process that decodes with
the bundled model (vLLM's response shape with `return_token_ids`, llama-server's with `tokens`, and a server
that returns text only). That checks what the client sends (token ids, not text) and how it decodes what
comes back; it is not a check of vLLM or llama-server themselves (docs/engines.md says what was run where).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from neoxja.engines import complete
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(bundled_dir):
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(bundled_dir, dtype="float32")
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            ids = body["prompt"]
            if self.path != "/v1/completions" or not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "prompt must be token ids"}')
                return
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"], do_sample=False)
            new = out[0, len(ids):].tolist()
            choice = {"index": 0, "text": "", "finish_reason": "length"}
            if server_state["shape"] == "vllm":
                choice["token_ids"] = new
            elif server_state["shape"] == "llama":
                choice["tokens"] = new
            else:
                choice["text"] = "server text"
            payload = json.dumps({"object": "text_completion", "choices": [choice]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server_state = {"shape": "vllm"}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", server_state, seen, model
    httpd.shutdown()


def test_complete_sends_ids_and_decodes_ids_with_neoxja(server, bundled_dir):
    url, state, seen, model = server
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    prompt = "吾輩は猫である。"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    for shape in ("vllm", "llama"):
        state["shape"] = shape
        result = complete(url, prompt, tokenizer=tok, max_tokens=12, model="neox")
        assert result.token_ids == expected and result.text == tok.decode(expected)
        assert result.prompt_token_ids == ids and result.finish_reason == "length"
    path, body = seen[-1]
    assert path == "/v1/completions" and body["prompt"] == ids and body["model"] == "neox"
    assert body["temperature"] == 0.0 and body["return_token_ids"] is True
    state["shape"] = "text"
    result = complete(url + "/v1", ids, tokenizer=bundled_dir, max_tokens=3)  # ids in; the base may end in /v1
    assert result.text == "server text" and result.token_ids is None
    state["shape"] = "vllm"


def test_complete_errors_are_clear(server, bundled_dir):
    url, *_ = server
    with pytest.raises(ValueError, match="http"):
        complete("localhost:8000", "x", tokenizer=bundled_dir)
    with pytest.raises(ValueError, match="max_tokens"):
        complete(url, "x", tokenizer=bundled_dir, max_tokens=0)
    with pytest.raises(TypeError, match="prompt must be a str or a list of token ids"):
        complete(url, [1.5], tokenizer=bundled_dir)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        complete(url + "/v2/completions", "x", tokenizer=bundled_dir)
    with pytest.raises(ConnectionError, match="cannot reach"):
        complete("http://127.0.0.1:9/v1", "x", tokenizer=bundled_dir, timeout=5)


def test_ctranslate2_and_gguf_exports_need_no_transformers(bundled_dir, tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of transformers fails
        "import neoxja\n"
        f"neoxja.export({str(bundled_dir)!r}, {str(tmp_path / 'ct2')!r}, to='ctranslate2', quantization='int8')\n"
        f"neoxja.export({str(bundled_dir)!r}, {str(tmp_path / 'm.gguf')!r}, to='gguf', type='q8_0')\n"
        f"neoxja.export({str(bundled_dir)!r}, {str(tmp_path / 'neox')!r}, to='gpt-neox')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ct2" / "model.bin").is_file() and (tmp_path / "m.gguf").is_file()
    assert (tmp_path / "neox" / "model.safetensors").is_file()
