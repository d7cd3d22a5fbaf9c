"""`AsyncEngine`: the Engine stepping in its own thread, fed and read from asyncio.

`generate(...)` is an async iterator of StepOutput; leaving it early (a client that disconnects, a
cancelled task) aborts the request, and the engine frees its slot at its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
from typing import AsyncIterator

from neoxja.serving.engine import Engine, Request, RequestRefused, StepOutput
from neoxja.sampling import SamplingParams


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # callables run by the engine thread
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._pending = 0  # submitted, not yet finished (read from the event loop's thread)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="neoxja-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ----

    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                command()
            if not engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                engine.step()
            except Exception as e:  # a bug or a device error: fail every request rather than hang them
                traceback.print_exc()
                self.error = e
                for request in list(engine.requests.values()):
                    request.aborted = True
                try:
                    engine._retire_aborted()
                except Exception:  # pragma: no cover
                    traceback.print_exc()

    def _submit(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- asyncio side ----

    @property
    def num_unfinished(self) -> int:
        return self._pending

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        return self.engine.check_prompt(prompt_ids or [0], max_tokens)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        if self._stop:
            raise RuntimeError("the engine is shut down")
        if self._pending >= self.engine.max_num_seqs + self.max_queue:  # every slot busy, queue full
            raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, list(prompt_ids), params,
                          on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        error: list[BaseException] = []

        def add():
            try:
                self.engine.add_request(request)
            except Exception as e:
                error.append(e)
                loop.call_soon_threadsafe(outputs.put_nowait, None)

        self._pending += 1
        finished = False
        try:
            self._submit(add)
            while True:
                out = await outputs.get()
                if out is None:
                    raise error[0]
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._pending -= 1
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)


__all__ = ["AsyncEngine", "QueueFull", "RequestRefused"]
