"""The frontend's handle on an engine core running in a process of its own.

`CoreClient` spawns the core process (core_process.run_core), learns the model's limits and tokenizer from its
handshake, sends it requests, aborts, adapter loads and unloads and the shutdown, and turns its one message per
step into each request's text deltas (output.py), all on the frontend's event loop. It watches the process: if
the core dies or reports itself unhealthy, every open stream fails at once with `EngineDead`, and the `on_dead`
callbacks run (serve.py's stops the server). Messages are msgspec structs (request.py) over two ZMQ PUSH/PULL
sockets on ipc:// endpoints.

Nothing here imports torch: the frontend process never loads it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from nanokyro.config import EngineConfig
from nanokyro.output import OutputProcessor
from nanokyro.request import (
    AbortRequest, AdapterReply, AddRequest, Delta, EngineStats, Failure, FromCore, Limits, LoadAdapter, LoadFailed,
    Ready, SamplingParams, SeqOutput, Shutdown, StepOutputs, Unhealthy, UnloadAdapter,
)  # fmt: skip
from nanokyro.tokenizer import Tokenizer

log = logging.getLogger("nanokyro")

CORE_ENTRY = "nanokyro.core_process:run_core"


class EngineDead(RuntimeError):
    """The core process is gone, or has stopped stepping."""


class RequestFailed(Exception):
    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.status = failure.status


# The core process: a fresh interpreter (not multiprocessing, which would re-run the caller's main module there)
# that imports the entry by name, so the frontend never imports the core (torch), and reads its config on stdin.
_CORE_MAIN = ("import importlib, sys; module, name = sys.argv[1].split(':'); "
              "getattr(importlib.import_module(module), name)(sys.stdin.buffer.read(), *sys.argv[2:])")  # fmt: skip


class _Stream:
    """One request's deltas as they arrive; a reader takes everything that arrived since its last read."""

    def __init__(self):
        self.items: list[Delta | BaseException] = []
        self.ready = asyncio.Event()

    def put(self, item: Delta | BaseException) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self) -> list[Delta | BaseException]:
        await self.ready.wait()
        self.ready.clear()
        items, self.items = self.items, []
        return items


class CoreClient:
    """Start with `await CoreClient.start(cfg)`; then `generate()` streams a request's deltas."""

    def __init__(self, cfg: EngineConfig, core_entry: str = CORE_ENTRY):
        self._dir = tempfile.mkdtemp(prefix="nanokyro-")
        to_core, from_core = f"ipc://{self._dir}/to_core", f"ipc://{self._dir}/from_core"
        self._sync_ctx, self._ctx = zmq.Context(), zmq.asyncio.Context()
        self._outbox = self._sync_ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.bind(to_core)
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(from_core)
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
        # A session (and process group) of its own: a kill reaches the ranks it starts too.
        self.process = subprocess.Popen([sys.executable, "-c", _CORE_MAIN, core_entry, to_core, from_core],
                                        stdin=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip
        self.process.stdin.write(msgspec.msgpack.encode(cfg))
        self.process.stdin.close()
        self.model_name = ""
        self.limits: Limits | None = None
        self.tokenizer: Tokenizer | None = None
        self.stats = EngineStats()
        self.error: str | None = None  # why the engine can't serve: set once, never cleared
        self.on_dead: list[Callable[[], None]] = []  # called once when the engine can no longer serve
        self._streams: dict[str, _Stream] = {}
        self._outputs: OutputProcessor | None = None
        self._receiver: asyncio.Task | None = None
        self._closing = False
        self.adapters: dict[str, str] = {}  # LoRA adapters the core serves: name -> path
        self.max_loras = 0
        self._replies: dict[int, asyncio.Future] = {}
        self._reply_ids = itertools.count()

    @classmethod
    async def start(cls, cfg: EngineConfig, core_entry: str = CORE_ENTRY) -> CoreClient:
        """Spawn the core and wait for its handshake (the model loads meanwhile). Raises if loading fails."""
        client = cls(cfg, core_entry)
        loop = asyncio.get_running_loop()

        def watch() -> None:
            client.process.wait()
            if not loop.is_closed():
                loop.call_soon_threadsafe(client._core_exited)

        threading.Thread(target=watch, name="nanokyro-core-watch", daemon=True).start()
        try:
            ready = await client._handshake()
        except BaseException:
            await client.close()
            raise
        client.model_name, client.limits = ready.model_name, ready.limits
        client.adapters, client.max_loras = dict(ready.adapters), ready.max_loras
        if ready.tokenizer is not None:  # a large vocabulary takes a moment to build: not on the event loop
            client.tokenizer = await asyncio.to_thread(Tokenizer.from_spec, ready.tokenizer)
        client._outputs = OutputProcessor(client.tokenizer)
        client._receiver = asyncio.create_task(client._receive())
        return client

    async def _handshake(self) -> Ready:
        receive = asyncio.ensure_future(self._inbox.recv())
        died = asyncio.ensure_future(self._died())
        await asyncio.wait({receive, died}, return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        if not receive.done():
            receive.cancel()
            raise EngineDead(f"the engine core process died while starting (exit code {self.process.returncode})")
        msg = self._decoder.decode(receive.result())
        if isinstance(msg, LoadFailed):
            raise RuntimeError(f"the engine core failed to load the model: {msg.message}")
        return msg

    async def _died(self) -> None:
        while self.process.poll() is None:
            await asyncio.sleep(0.05)

    @property
    def healthy(self) -> bool:
        return self.error is None

    # -- requests -------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[list[Delta]]:  # fmt: skip
        """The request's deltas, a batch at a time (what arrived since the last batch). Leaving early (a client
        that hung up) aborts the request in the core. Raises RequestFailed, or EngineDead."""
        if self.error is not None:
            raise EngineDead(self.error)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream()
        finished = 0  # counted here, as the reader sees them: more may have arrived while it was away
        try:
            self._outputs.add(request_id, prompt_ids, params)
            self._send(AddRequest(request_id, prompt_ids, params))
            while finished < params.n:
                items = await stream.take()
                deltas = [item for item in items if not isinstance(item, BaseException)]
                finished += sum(d.finish_reason is not None for d in deltas)
                if deltas:
                    yield deltas
                if len(deltas) < len(items) and finished < params.n:  # an error ends what has not finished
                    raise next(item for item in items if isinstance(item, BaseException))
        finally:
            del self._streams[request_id]
            self._outputs.remove(request_id)
            if finished < params.n:
                self._send(AbortRequest(request_id))  # the consumer went away: free the pages now

    async def change_adapter(self, name: str, path: str | None) -> AdapterReply:
        """Load (with a path) or unload a LoRA adapter in the core, between its steps; returns its reply."""
        if self.error is not None:
            raise EngineDead(self.error)
        reply_id = next(self._reply_ids)
        future = self._replies[reply_id] = asyncio.get_running_loop().create_future()
        try:
            self._send(LoadAdapter(reply_id, name, path) if path is not None else UnloadAdapter(reply_id, name))
            return await future
        finally:
            self._replies.pop(reply_id, None)

    def end_all(self, message: str) -> None:
        """End every open stream with an error, and abort its request in the core (a shutdown's grace is over)."""
        for request_id, stream in self._streams.items():
            stream.put(EngineDead(message))
            self._send(AbortRequest(request_id))

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def _send(self, msg) -> None:
        try:
            self._outbox.send(self._encoder.encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no core connected (gone, or not started yet): nothing to tell it
            if not isinstance(msg, (AbortRequest, Shutdown)):
                raise EngineDead(self.error or "the engine core is not connected") from None

    # -- what the core sends --------------------------------------------------------------------------------

    async def _receive(self) -> None:
        try:
            while True:
                msg = self._decoder.decode(await self._inbox.recv())
                if isinstance(msg, StepOutputs):
                    self.stats = msg.stats
                    for out in msg.outputs:
                        self._route(out)
                elif isinstance(msg, Unhealthy):
                    self._fail(f"the engine is unhealthy: {msg.message}")
                elif isinstance(msg, AdapterReply):
                    self.adapters = dict(msg.adapters)
                    future = self._replies.get(msg.reply_id)
                    if future is not None and not future.done():
                        future.set_result(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # nothing would reach the streams any more: fail them rather than hang
            log.exception("the frontend's receive loop failed")
            self._fail(f"the frontend lost the engine core's messages: {e!r}")

    def _route(self, out: SeqOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # its reader left already
            return
        if out.error is not None:
            stream.put(RequestFailed(out.error))
            return
        try:
            delta, stopped = self._outputs.process(out)
        except Exception as e:  # detokenising this request failed: it fails alone
            log.exception("request %s: processing its output failed", out.request_id)
            stream.put(RequestFailed(Failure(500, f"processing the output failed: {e!r}")))
            return
        if stopped:
            self._send(AbortRequest(out.request_id, out.index))
        if delta is not None:
            stream.put(delta)

    def _core_exited(self) -> None:
        if self._closing:
            return
        self._fail(f"the engine core process died (exit code {self.process.returncode})")

    def _fail(self, error: str) -> None:
        """The engine can no longer serve (its process died, it reported itself unhealthy, or its messages are lost):
        every open stream ends with EngineDead, new requests fail fast, and the on_dead callbacks run, once."""
        first = self.error is None
        if first:
            log.error("%s", error)
            self.error = error
        for stream in self._streams.values():
            stream.put(EngineDead(self.error))
        for future in self._replies.values():
            if not future.done():
                future.set_exception(EngineDead(self.error))
        if first:  # after the streams have their error: a callback may begin a shutdown that drains them
            for callback in self.on_dead:
                callback()

    # -- shutdown -------------------------------------------------------------------------------------------

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the core (its last message aborts what is left) and wait for its process; kill it, and the ranks
        it started, if it hangs, or if it has not finished loading (it reads no message before that)."""
        self._closing = True
        try:
            if self.process.poll() is None and self._receiver is not None:
                self._send(Shutdown())
                await asyncio.to_thread(self.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the engine core did not stop in %.0f s: killing it", timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):  # its own process group: the core and the ranks it started
                os.killpg(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait)
        if self._receiver is not None:
            await asyncio.sleep(0.05)  # let the last outputs reach their streams
            self._receiver.cancel()
        for stream in self._streams.values():
            stream.put(EngineDead("the server is shutting down"))
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._ctx.term()
        self._sync_ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
