"""A contender engine (CTranslate2, llama.cpp) in its own process, driven from a benchmark over a pipe.

Why a process of its own: torch, CTranslate2 and llama.cpp (built with OpenMP) all run their threads on
the same libgomp once torch is imported (torch loads it globally, and the others resolve to it). Every
thread that starts a parallel region gets its own team of workers, and when a process holds more OpenMP
workers than CPUs, libgomp stops letting idle workers spin (GOMP_SPINCOUNT's "throttled" count, 100 spins
instead of ~300,000): each parallel region then waits for its workers to be woken by the kernel. On a 2-core
machine one CTranslate2 generation in the benchmark's process left every later torch op paying that wake-up:
a 10,240-wide GELU went from 11 to 95 us, and neoxja int8 decoding from 50 to 41 tok/s for the rest of the
run. Nobody serves two engines from one process, so each contender runs in its own, as it would in use.

Parent side: `EngineProcess(spec)` starts `python _engine_worker.py`, sends the spec (JSON), and
`generate()` returns (new token ids, seconds the generation took inside the worker). Specs:
  {"engine": "ctranslate2", "path": DIR, "compute_type": "int8_float32", "threads": 2, "tokens": [str], "new": 64}
  {"engine": "llama.cpp", "path": GGUF, "threads": 2, "ids": [int], "new": 64, "n_ctx": 104, "safe": {...}}
`first_logits()` (llama.cpp) returns the logits after the prompt from a fresh context.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


class EngineProcess:
    def __init__(self, spec: dict):
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        try:
            self.info = self._call(spec)  # the worker answers once the engine is loaded
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.spec['engine']} worker exited (status {self.proc.wait()}); "
                               f"its error is printed above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.spec['engine']} worker: {reply['error']}")
        return reply

    def generate(self) -> tuple[list[int], float]:
        reply = self._call({"cmd": "generate"})
        return reply["tokens"], reply["seconds"]

    def first_logits(self) -> list[float]:
        return self._call({"cmd": "first_logits"})["logits"]

    def close(self) -> None:
        """Stop the worker (end of its input; killed if it has not exited 30 s later). Idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _ctranslate2(spec: dict):
    import ctranslate2

    generator = ctranslate2.Generator(spec["path"], device="cpu", compute_type=spec["compute_type"],
                                      intra_threads=spec["threads"], inter_threads=1)

    def generate():
        result = generator.generate_batch([spec["tokens"]], max_length=spec["new"], sampling_topk=1,
                                          include_prompt_in_result=False, end_token=[])  # EOS off, as ours
        return result[0].sequences_ids[0]

    return {"generate": generate}


def _llama_cpp(spec: dict):
    import llama_cpp

    llm = llama_cpp.Llama(spec["path"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False, **spec.get("safe", {}))

    def generate():
        out = []
        for token in llm.generate(spec["ids"], top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == spec["new"]:
                break
        return out

    def first_logits():
        fresh = llama_cpp.Llama(spec["path"], n_ctx=len(spec["ids"]) + 8, n_threads=spec["threads"], verbose=False,
                                logits_all=True, **spec.get("safe", {}))  # a fresh context: nothing cached
        fresh.eval(spec["ids"])
        return [float(x) for x in fresh.scores[len(spec["ids"]) - 1]]

    return {"generate": generate, "first_logits": first_logits}


def main() -> int:
    # replies go out on a copy of stdout; file descriptor 1 itself goes to stderr, so that whatever an engine's
    # native code prints cannot land inside a reply
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.loads(sys.stdin.readline())
    try:
        commands = {"ctranslate2": _ctranslate2, "llama.cpp": _llama_cpp}[spec["engine"]](spec)
        reply = {"ok": True}
    except Exception as e:  # report it to the parent rather than die silently
        commands, reply = {}, {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), file=replies, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        try:
            if cmd == "generate":
                t = time.perf_counter()
                tokens = commands["generate"]()
                reply = {"tokens": [int(x) for x in tokens], "seconds": time.perf_counter() - t}
            else:
                reply = {"logits": commands[cmd]()}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=replies, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
