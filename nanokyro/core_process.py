"""The engine core in a process of its own, the server's: `run_core` loads the model and answers the
frontend's handshake, then `CoreLoop` steps it, a busy loop with no asyncio that takes `ToCore` messages over
ZMQ and answers with one `StepOutputs` per step. Faults stay inside: a request that fails is answered with an
error, and steps that keep failing (or a lost device) make the core report itself unhealthy."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import traceback

import msgspec
import torch

from nanokyro.config import EngineConfig
from nanokyro.core import AdapterInUse, EngineCore
from nanokyro.lora import AdapterError
from nanokyro.request import (
    AbortRequest, AdapterReply, AddRequest, Failure, FromCore, LoadAdapter, LoadFailed, SeqOutput, Shutdown,
    StepOutputs, ToCore, Unhealthy, UnknownAdapter, UnloadAdapter,
)  # fmt: skip

log = logging.getLogger("nanokyro")

MAX_STEP_FAILURES = 3  # consecutive failed steps after which the core stops stepping and reports itself unhealthy


def run_core(config: bytes, to_core: str, from_core: str) -> None:
    """The core process: load the model, answer the handshake, then step until told to shut down (or until the
    frontend that started it is gone). `config` is a msgpack EngineConfig; the addresses are ZMQ endpoints the
    frontend has bound."""
    import zmq

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group: the frontend alone decides when to stop
    # (it drains its streams first), and the core follows its Shutdown message, or its death.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cfg = msgspec.msgpack.decode(config, type=EngineConfig)
    if cfg.torch_device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to the frontend: intra-op threads that spin while the frontend's thread holds their core
        # make every step wait for the scheduler (64 tokens took 9 s instead of 0.2 s on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow frontend
    inbox.connect(to_core)
    outbox.connect(from_core)
    try:
        try:
            core = EngineCore(cfg)
        except Exception as e:
            log.error("loading the model failed: %s", traceback.format_exc())
            outbox.send(msgspec.msgpack.encode(LoadFailed(f"{type(e).__name__}: {e}")))
            return
        outbox.send(msgspec.msgpack.encode(core.ready()))
        try:
            CoreLoop(core, inbox, outbox).run()
        finally:
            core.close()
    finally:
        outbox.close(linger=1000)  # the last messages (aborts at shutdown) still go out
        inbox.close(linger=0)
        ctx.term()


class CoreLoop:
    """The step loop of a core process: take messages, step while there is work, publish each step's outputs
    (with what the messages produced: aborts, rejections) as one message.

    A new request with a grammar is compiled on a thread (a large schema takes seconds) and queued when ready; a
    bad one is answered with an "error" output that the frontend turns into a 400.
    """

    def __init__(self, core: EngineCore, inbox, outbox):
        self.core, self.inbox, self.outbox = core, inbox, outbox
        self.decoder = msgspec.msgpack.Decoder(ToCore)
        self.encoder = msgspec.msgpack.Encoder()
        self.outs: list[SeqOutput] = []  # to publish with the next step's
        self.compiling: dict[str, tuple[concurrent.futures.Future, AddRequest]] = {}
        self.reading: list[tuple[concurrent.futures.Future, LoadAdapter]] = []  # LoRA adapters read on a thread
        self.compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="nanokyro-grammar")
        self.parent = os.getppid()
        self.unhealthy: str | None = None
        self.failures = 0  # consecutive failed steps
        self.stopping = False

    def run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        idle_published = True
        while not self.stopping and os.getppid() == self.parent:  # a frontend that died leaves no core behind
            busy = self.core.has_work() and self.unhealthy is None
            # Idle: wait for a message, waking now and then for compiled grammars and to look for the frontend.
            if poller.poll(0 if busy else 5 if self.compiling or self.reading else 1000):
                self._take_messages()
            self._queue_compiled()
            self._register_read()
            if self.stopping:
                break
            stepped = self.core.has_work() and self.unhealthy is None
            if stepped:
                self.outs += self._step()
            if self.outs or stepped or not idle_published:  # after the last step: the stats of an idle engine
                self._send(StepOutputs(self.outs, self.core.stats()))
                self.outs, idle_published = [], not stepped
        self.compiler.shutdown(wait=False, cancel_futures=True)
        self._send(StepOutputs(self.outs + self.core.fail_all(), self.core.stats()))  # the aborts of what is left

    def _step(self) -> list[SeqOutput]:
        try:
            outs = self.core.step()
            self.failures = 0
            return outs
        except Exception as e:
            log.error("step failed: %s", traceback.format_exc())
            self.failures += 1
            device_error = isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e)
            if device_error or self.failures >= MAX_STEP_FAILURES:
                self.unhealthy = f"{self.failures} step(s) failed in a row, the last with {e!r}"
                self._send(Unhealthy(self.unhealthy))
            return self.core.fail_all(Failure(500, f"request failed inside the engine: {e!r}"))

    def _take_messages(self) -> None:
        import zmq

        while True:
            try:
                msg = self.decoder.decode(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(msg, AddRequest):
                self._add(msg)
            elif isinstance(msg, AbortRequest):
                if msg.request_id in self.compiling:
                    self.compiling.pop(msg.request_id)[0].cancel()
                self.outs += self.core.abort(msg.request_id, msg.index)
            elif isinstance(msg, Shutdown):
                self.stopping = True
            elif isinstance(msg, LoadAdapter) and self.core.loras is not None:
                # Reading the file takes a while for a large model: on a thread, so the steps go on meanwhile.
                self.reading.append((self.compiler.submit(self.core.loras.read, msg.path), msg))
            elif isinstance(msg, (LoadAdapter, UnloadAdapter)):
                self._send(self._adapter(msg))

    def _register_read(self) -> None:
        """Register the adapters whose files are read, in the order they were asked for, and reply."""
        while self.reading and self.reading[0][0].done():
            future, msg = self.reading.pop(0)
            self._send(self._adapter(msg, future))

    def _adapter(self, msg: LoadAdapter | UnloadAdapter, read: concurrent.futures.Future | None = None
                 ) -> AdapterReply:  # fmt: skip
        """Load (its file read by `read`) or unload a LoRA adapter between steps; the reply carries the outcome as
        an HTTP status."""
        try:
            if isinstance(msg, LoadAdapter):
                self.core.load_lora(msg.name, msg.path, read.result() if read is not None else None)
            else:
                self.core.unload_lora(msg.name)
            status, message = 200, ""
        except UnknownAdapter as e:
            status, message = 404, str(e)
        except AdapterInUse as e:
            status, message = 409, str(e)
        except AdapterError as e:
            status, message = 400, str(e)
        except Exception as e:
            log.error("adapter %s failed: %s", msg.name, traceback.format_exc())
            status, message = 500, f"{type(e).__name__}: {e}"
        return AdapterReply(msg.reply_id, status, message, self.core.adapters())

    def _add(self, msg: AddRequest) -> None:
        if self.unhealthy is not None:
            return self._reject(msg, Failure(503, f"the engine is unhealthy: {self.unhealthy}"))
        try:
            self.core.limits.validate(msg.prompt_ids, msg.params)
            if msg.params.lora is not None and msg.params.lora not in self.core.adapters():
                raise UnknownAdapter(msg.params.lora)
        except ValueError as e:
            return self._reject(msg, Failure(getattr(e, "status", 400), str(e)))
        if msg.params.structured is not None:
            future = self.compiler.submit(self.core.grammars.compile, msg.params.structured)
            self.compiling[msg.request_id] = (future, msg)
        else:
            self._enqueue(msg)

    def _queue_compiled(self) -> None:
        for rid, (future, msg) in list(self.compiling.items()):
            if future.done():
                del self.compiling[rid]
                error = future.exception()
                self._reject(msg, Failure(400, str(error))) if error is not None else self._enqueue(msg)

    def _enqueue(self, msg: AddRequest) -> None:
        try:
            self.core.enqueue(msg.prompt_ids, msg.params, msg.request_id)
        except UnknownAdapter as e:  # unloaded while its grammar compiled
            self._reject(msg, Failure(404, str(e)))
        except Exception as e:
            log.error("adding request %s failed: %s", msg.request_id, traceback.format_exc())
            self._reject(msg, Failure(500, f"adding the request failed: {e!r}"))

    def _reject(self, msg: AddRequest, error: Failure) -> None:
        n = len(msg.prompt_ids)
        self.outs += [SeqOutput(msg.request_id, i, [], None, "error", n, 0, 0.0, error) for i in range(msg.params.n)]

    def _send(self, msg: FromCore) -> None:
        self.outbox.send(self.encoder.encode(msg), copy=False)
