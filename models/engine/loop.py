"""The engine in a background thread, for asyncio callers (the HTTP server).

Handlers only enqueue and await: `submit` validates the request in the caller's thread (bad
requests fail at once, before queuing), refuses it when the queue is full (QueueFull -> 429),
and returns a RequestStream whose outputs arrive on the caller's event loop. The engine thread
owns the Engine exclusively: it drains the inbox (new requests, aborts) between steps, so
requests join the running batch between decode steps. A step that raises fails only its
requests (Engine.step); anything worse fails every request in flight and the loop goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque

from .engine import Engine, RequestOutput
from .sampling import SamplingParams


class QueueFull(RuntimeError):
    pass


class RequestStream:
    """Async iterator over one request's RequestOutputs; ends after the finished one."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self._loop = request_id, loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _put(self, out: RequestOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self._inbox: deque = deque()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def num_pending(self) -> int:
        """Requests accepted and not finished (queued, waiting or running)."""
        return len(self._streams)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Call from the event loop. Raises RequestError (bad request) or QueueFull."""
        self.engine.validate(prompt_ids, params)
        with self._wake:
            if len(self._streams) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._streams)} requests in flight "
                                f"(limit {self.max_queue}); retry later")
            stream = RequestStream(f"cmpl-{next(self._ids)}", asyncio.get_running_loop())
            self._streams[stream.request_id] = stream
            self._inbox.append(("add", stream.request_id, list(prompt_ids), params))
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """The client went away: free the request's pages at the next step boundary."""
        with self._wake:
            if request_id in self._streams:
                self._inbox.append(("abort", request_id))
                self._wake.notify()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not self.engine.has_work():
                    self._wake.wait()
                if self._stop:
                    break
                inbox, self._inbox = list(self._inbox), deque()
            for item in inbox:
                self._handle(item)
            if self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - the loop must outlive any one bug
                    outputs = self._fail_all(f"engine failure: {type(e).__name__}: {e}")
                for out in outputs:
                    self._deliver(out)

    def _handle(self, item) -> None:
        if item[0] == "add":
            _, rid, prompt_ids, params = item
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except Exception as e:  # noqa: BLE001 - validated already; report anything else
                self._deliver(RequestOutput(rid, [], True, "error", str(e), len(prompt_ids)))
        else:
            rid = item[1]
            self.engine.abort(rid)
            self._deliver(RequestOutput(rid, [], True, "abort"))

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outs = []
        for rid in list(self._streams):
            self.engine.abort(rid)
            outs.append(RequestOutput(rid, [], True, "error", message))
        return outs

    def _deliver(self, out: RequestOutput) -> None:
        with self._wake:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if stream is not None:
            stream._put(out)
