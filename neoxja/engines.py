"""Talking to other inference engines with neoxja's exact tokenizer: token ids in, token ids out.

The engines' own copy of this tokenizer is transformers', with its defects; each engine that accepts token
ids gets them from neoxja instead (see docs/engines.md):

    from neoxja.engines import complete
    print(complete("http://localhost:8000", "吾輩は猫である。", max_tokens=32).text)

`complete` tokenizes with neoxja, sends the ids as the prompt of an OpenAI-compatible `/v1/completions`
request (vLLM started with `--skip-tokenizer-init`, llama.cpp's llama-server, `neoxja serve`), and decodes
the ids that come back with neoxja. Plain urllib: no HTTP client dependency for one POST.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Completion:
    text: str
    token_ids: list[int] | None  # None when the server returned text only
    finish_reason: str | None
    prompt_token_ids: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)


def _tokenizer(tokenizer):
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    if isinstance(tokenizer, GPTNeoXJapaneseTokenizer):
        return tokenizer
    if tokenizer is None:
        from neoxja.assets import default_model_dir

        tokenizer = default_model_dir()
    return GPTNeoXJapaneseTokenizer.from_pretrained(tokenizer)


def complete(url: str, prompt: str | list[int], *, tokenizer=None, model: str | None = None, max_tokens: int = 16,
             temperature: float = 0.0, timeout: float = 60.0, api_key: str | None = None, **params) -> Completion:
    """Complete `prompt` (text, or token ids) at the OpenAI-compatible server `url` (its base, e.g.
    http://host:8000, or the full .../v1/completions address).

    tokenizer: a GPTNeoXJapaneseTokenizer or its directory (default: the bundled model's).
    model: the server's model name (vLLM wants the one it serves; others ignore it).
    params: other request fields (top_p, stop_token_ids, seed, ...), sent as they are.
    The returned text is decoded by neoxja from the completion's token ids when the server returns them
    (vLLM's `token_ids` with return_token_ids, llama-server's `tokens`); otherwise it is the server's text.
    """
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must be an http(s) address, got {url!r}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    tok = _tokenizer(tokenizer)
    if isinstance(prompt, str):
        ids = tok(prompt)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
    else:
        raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("the prompt has no tokens")
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/completions"):
        endpoint += "/completions" if endpoint.endswith("/v1") else "/v1/completions"
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": temperature,
            "return_token_ids": True,  # vLLM: return the completion's ids
            "return_tokens": True,  # llama-server: the same
            **params}
    if model is not None:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")[:500]
        raise RuntimeError(f"{endpoint} answered HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise ConnectionError(f"cannot reach {endpoint}: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{endpoint} did not answer JSON: {e}") from None
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"{endpoint} answered without choices: {str(data)[:500]}") from None
    out_ids = choice.get("token_ids", choice.get("tokens"))
    if isinstance(out_ids, list) and all(isinstance(i, int) for i in out_ids):
        text = tok.decode(out_ids, skip_special_tokens=True)  # an EOS among the ids is not text
    else:
        out_ids, text = None, choice.get("text", "")
    return Completion(text=text, token_ids=out_ids, finish_reason=choice.get("finish_reason"),
                      prompt_token_ids=ids, raw=data)


def ctranslate2_tokens(ids: list[int], export_dir: str | os.PathLike) -> list[str]:
    """Token ids -> the token strings of a `neoxja export --to ctranslate2` directory, for
    `ctranslate2.Generator.generate_batch` (which takes strings); decode its `sequences_ids` with neoxja."""
    vocab = _ct2_vocabulary(str(Path(export_dir).resolve()))
    try:
        return [vocab[i] for i in ids]
    except (IndexError, TypeError):
        bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < len(vocab))
        raise ValueError(f"token id {bad!r} is out of range [0, {len(vocab)}) for {export_dir}") from None


_VOCABS: dict[str, list[str]] = {}


def _ct2_vocabulary(directory: str) -> list[str]:
    if directory not in _VOCABS:
        path = Path(directory) / "neoxja_vocabulary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a `neoxja export --to ctranslate2` directory?")
        _VOCABS[directory] = json.loads(path.read_text(encoding="utf-8"))
    return _VOCABS[directory]
