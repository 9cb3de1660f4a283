"""The step loop, and the two ways to drive it: `LLM` (offline, synchronous) and `AsyncEngine` (a thread
stepping beside an asyncio server, streaming each request's increments).

A step is pipelined with the device: schedule step n and launch it (model and sampling), then, while the GPU
runs it, bring step n-1's tokens to the host, detokenise them, check stops and emit their deltas. Step n's
tokens stay on the device, where step n+1 reads them as input ids; on the host they are placeholders until
then. A sequence that stops at step n-1 was already scheduled in step n: that extra token is dropped. Rows
whose sampling reads the host's view of earlier tokens (grammars, penalties) wait for step n-1 before sampling.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator

from nanokyro.block_manager import BlockManager
from nanokyro.config import EngineConfig
from nanokyro.grammar import GrammarCompiler, accept_tokens
from nanokyro.radix_cache import RadixCache
from nanokyro.runner import ModelRunner
from nanokyro.sampler import PendingSample, SamplerOutput, SamplingParams, make_generator
from nanokyro.scheduler import Scheduler, Sequence, Status
from nanokyro.tokenizer import Detokenizer

log = logging.getLogger("nanokyro")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class Delta:
    """What one completion gained in one step (or its end)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time: float = 0.0  # seconds the request waited before its first step


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    # The first completion's fields, for the common n == 1 case.
    text = property(lambda self: self.outputs[0].text)
    token_ids = property(lambda self: self.outputs[0].token_ids)
    finish_reason = property(lambda self: self.outputs[0].finish_reason)
    logprobs = property(lambda self: self.outputs[0].logprobs)

    def add(self, d: Delta) -> None:
        out = self.outputs[d.index]
        out.text += d.text
        out.token_ids += d.token_ids
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        out.finish_reason = d.finish_reason or out.finish_reason
        self.num_cached_tokens = d.num_cached_tokens


class PromptError(ValueError):
    """The request can't be served as asked (too long, bad ids...). The server answers 400."""


@dataclass
class _Request:
    seqs: list[Sequence]
    detoks: list[Detokenizer | None]


@dataclass
class _Step:
    """A launched step: its sampled sequences, where each one's placeholder sits, and the tokens on their way;
    once received on the host, the tokens, which rows are still live, and whether each grammar took its token."""

    seqs: list[Sequence]
    positions: list[int]
    sample: PendingSample
    out: SamplerOutput | None = None
    live: list[int] = field(default_factory=list)
    accepted: dict[int, bool] = field(default_factory=dict)


class LLMEngine:
    """Owns the model, pages and queues; `step()` advances every scheduled sequence by one step."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({cfg.max_num_seqs}), or some running sequences would get no token each step")  # fmt: skip
        # Loads the model (with tensor/pipeline parallelism: starts the other ranks) and sizes the KV cache.
        self.runner = ModelRunner(cfg)
        self.tokenizer = self.runner.tokenizer
        self.model_name = cfg.served_model_name or self.runner.model_name
        mc = self.runner.model_cfg
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.num_pages = self.runner.num_pages
        # A sequence longer than the whole cache could never be resumed after preempting itself.
        self.max_model_len = min(self.max_model_len, self.num_pages * cfg.page_size)
        self.blocks = BlockManager(self.num_pages, cfg.page_size)
        self.cache = RadixCache(self.blocks) if cfg.enable_prefix_caching else None
        self.scheduler = Scheduler(self.blocks, cfg.max_num_batched_tokens, cfg.max_num_seqs, self.cache)
        self.vocab_size = mc.vocab_size
        self.eos_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else mc.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, sorted(self.eos_ids))
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._in_flight: _Step | None = None  # the launched step whose tokens have not reached the host yet

    # -- requests -------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("this model has no tokenizer (dummy weights): send token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError when the request can't fit; safe to call from any thread."""
        n = len(prompt_ids)
        if n == 0:
            raise PromptError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise PromptError(f"prompt token ids must be in [0, {self.vocab_size})")
        max_new = params.max_tokens or 1
        if n + max_new > self.max_model_len:
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n} and "
                f"max_tokens asks for {max_new} more ({n + max_new} in all)"
            )
        if self.blocks.pages_for(n + max_new) > self.num_pages:
            raise PromptError(f"prompt + max_tokens = {n + max_new} tokens exceed the KV cache ({self.num_pages} pages)")
        if params.structured is not None:
            self.grammars.compile(params.structured)  # cached; a ValueError names what is wrong in it

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        prompt_ids = self.encode(prompt)
        self.validate(prompt_ids, params)
        return self.enqueue(prompt_ids, params, request_id)

    def enqueue(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request whose prompt is already encoded and validated."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise PromptError(f"request id {request_id!r} is already in use")
        seqs, detoks = [], []
        device = self.runner.device
        max_len = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        for i in range(params.n):
            gen = make_generator(params.seed + i, device) if params.seed is not None else None
            seq = Sequence(request_id, i, list(prompt_ids), len(prompt_ids), params, max_len, gen,
                           leader=seqs[0] if seqs else None)  # fmt: skip
            if params.structured is not None:
                seq.matcher = self.grammars.matcher(params.structured)  # one per completion
            seqs.append(seq)
            detoks.append(
                Detokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens) if self.tokenizer else None
            )
        self.requests[request_id] = _Request(seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> list[Delta]:
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        deltas = []
        for seq, detok in zip(req.seqs, req.detoks):
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
                deltas.append(self._delta(seq, detok.flush() if detok else "", [], None, "abort"))
        return deltas

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    @property
    def prefix_cache_queried_tokens(self) -> int:
        return self.scheduler.prefix_queried_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.scheduler.prefix_hit_tokens

    # -- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[Delta]:
        """Launch the next step, and return what the one before it produced (with `overlap_schedule` off: what
        this one produced)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self.finish_in_flight()
        prev = self._in_flight
        logits = self.runner.forward(batch, prev.sample.tokens if prev is not None else None)
        if prev is not None and any(s.matcher is not None or s.params.penalised for s in batch.sampled):
            self._receive(prev)  # masks and penalties read step n-1's tokens on the host; its stops can wait
        sample = self.runner.sample(batch, logits)
        sampled = self.scheduler.update(batch, [-(row + 1) for row in range(len(sample.tokens))])
        self._in_flight = _Step(sampled, [s.num_tokens - 1 for s in sampled], sample)
        deltas = self._finish(prev) if prev is not None else []
        return deltas if self.cfg.overlap_schedule else deltas + self.finish_in_flight()

    def finish_in_flight(self) -> list[Delta]:
        """Wait for the launched step and return its deltas (the engine is then in step with the host)."""
        step, self._in_flight = self._in_flight, None
        return self._finish(step) if step is not None else []

    def _receive(self, step: _Step) -> None:
        """Bring a launched step's tokens to the host: in place of their placeholders, and into the grammars.
        Sequences finished or aborted since the step was launched are skipped."""
        if step.out is not None:
            return
        step.out = out = step.sample.result()
        step.live = [i for i, seq in enumerate(step.seqs) if seq.status is not Status.FINISHED]
        for i in step.live:
            step.seqs[i].token_ids[step.positions[i]] = out.token_ids[i]
        constrained = [i for i in step.live if step.seqs[i].matcher is not None]
        step.accepted = dict(zip(constrained, accept_tokens([step.seqs[i].matcher for i in constrained],
                                                            [out.token_ids[i] for i in constrained])))  # fmt: skip

    def _finish(self, step: _Step) -> list[Delta]:
        """Receive a launched step's tokens, detokenise them, check stops; returns their deltas."""
        self._receive(step)
        out, deltas = step.out, []
        for i in step.live:
            seq, token = step.seqs[i], out.token_ids[i]
            text, reason = self._text_and_stop(seq, token, step.positions[i] + 1, step.accepted.get(i, True))
            logprobs = None
            if out.logprobs is not None and seq.params.logprobs is not None:
                top = out.top_logprobs[i] if out.top_logprobs is not None else []
                logprobs = [TokenLogprob(token, out.logprobs[i], top[: seq.params.logprobs])]
            if reason is not None:
                self.scheduler.finish(seq, reason)
            deltas.append(self._delta(seq, text, [token], logprobs, reason))
        for rid in {d.request_id for d in deltas if d.finish_reason}:
            if all(s.status is Status.FINISHED for s in self.requests[rid].seqs):
                del self.requests[rid]
        return deltas

    def _text_and_stop(self, seq: Sequence, token: int, num_tokens: int, grammar_accepted: bool) -> tuple[str, str | None]:
        """The text `token` (the sequence's num_tokens-th) adds to `seq`, and why `seq` ends there, if it does."""
        params, detok = seq.params, self.requests[seq.request_id].detoks[seq.index]
        text, reason = "", None
        if not grammar_accepted:  # its mask allowed only what the grammar accepts: a bug if it happens
            log.error("request %s: the grammar rejected token %d", seq.request_id, token)
            reason = "abort"
        elif (seq.matcher is not None and seq.matcher.is_terminated()) or token in params.stop_token_ids or (
                token in self.eos_ids and not params.ignore_eos):  # fmt: skip
            reason = "stop"  # the stop token (also the one that ends a grammar) is in token_ids, not in the text
        elif detok is not None:
            text, stopped = detok.add([token])
            reason = "stop" if stopped else None
        if reason is None and num_tokens >= seq.max_len:
            reason = "length"
        if reason is not None and detok is not None:
            text += detok.flush()
        return text, reason

    def _delta(self, seq: Sequence, text, token_ids, logprobs, reason) -> Delta:
        return Delta(seq.request_id, seq.index, text, token_ids, logprobs, reason, seq.num_prompt_tokens,
                     seq.num_cached_tokens or 0, (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time)  # fmt: skip

    def close(self) -> None:
        """Stop the other ranks' processes, if any."""
        self.runner.close()

    def fail_all(self) -> list[str]:
        """After an error inside a step: end every request, freeing its pages. Returns their ids."""
        self._in_flight = None
        ids = list(self.requests)
        for rid in ids:
            self.abort(rid)
        return ids


class LLM:
    """Offline use: `LLM(model, **engine_options).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False):
        """prompts: a string, a list of token ids, or a list of either. Returns RequestOutputs in input order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        prompts = [self.engine.encode(p) for p in prompts]
        for prompt, p in zip(prompts, params):  # all or nothing: no request is queued if one is bad
            self.engine.validate(prompt, p)
        outputs = {}
        for prompt, p in zip(prompts, params):
            rid = self.engine.enqueue(prompt, p)
            prompt_ids = self.engine.requests[rid].seqs[0].prompt_ids
            outputs[rid] = RequestOutput(rid, prompt_ids, [CompletionOutput(i) for i in range(p.n)])
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.n for p in params), desc="generate", unit="seq")
        while self.engine.has_work():
            for d in self.engine.step():
                outputs[d.request_id].add(d)
                if bar is not None and d.finish_reason:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return list(outputs.values())

    def close(self) -> None:
        """Stop the other ranks' processes (tensor/pipeline parallelism); also done when the LLM is collected."""
        self.engine.close()

    def chat(self, messages, params: SamplingParams | None = None, use_tqdm: bool = False):
        """One conversation (a list of messages) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(conv) for conv in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm)


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    """Runs LLMEngine.step() in a thread of its own; each request streams its Deltas to an asyncio queue."""

    def __init__(self, cfg: EngineConfig):
        self.engine = LLMEngine(cfg)
        self.tokenizer, self.model_name = self.engine.tokenizer, self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # set if the step loop died
        self.num_requests_waiting = 0
        self.num_requests_running = 0

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanokyro-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Let in-flight requests finish for up to grace_s, then abort the rest and stop the loop."""
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        self._stopping = True
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self.engine.close()

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenise and validate in the caller's thread, so bad requests fail before they are queued."""
        ids = self.engine.encode(prompt)
        self.engine.validate(ids, params)
        return ids

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> AsyncIterator[Delta]:
        if not self.healthy:
            raise EngineDead(f"the engine loop is not running: {self.error!r}")
        request_id = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", (request_id, prompt_ids, params)))
        finished = 0
        try:
            while finished < params.n:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished += item.finish_reason is not None
                yield item
        finally:
            if self._streams.pop(request_id, None) is not None and finished < params.n:
                self.abort(request_id)  # the consumer went away (client disconnect): free the pages now

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- the engine thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=not self.engine.has_work())
                if self._stopping:
                    break
                try:
                    deltas = self.engine.step()
                except Exception as e:  # a bug hit a step: fail the requests in flight, keep the loop serving
                    log.error("step failed: %s", traceback.format_exc())
                    for rid in self.engine.fail_all():
                        self._publish(rid, RuntimeError(f"request failed inside the engine: {e!r}"))
                    continue
                for d in deltas:
                    self._publish(d.request_id, d)
                sched = self.engine.scheduler
                self.num_requests_waiting, self.num_requests_running = len(sched.waiting), len(sched.running)
            self._take_commands(block=False)  # the aborts shutdown queued: their streams get their finish
        except BaseException as e:
            self.error = e
            log.error("engine loop died: %s", traceback.format_exc())
            for rid in list(self._streams):
                self._publish(rid, EngineDead(f"the engine loop died: {e!r}"))

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(block=block)
            while True:
                self._apply(*cmd)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            request_id, prompt_ids, params = arg
            if request_id in self._streams:  # else its client already left
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except Exception as e:
                    self._publish(request_id, e)
        elif kind == "abort":
            for d in self.engine.abort(arg):  # the stream, if still read (shutdown), gets its finish
                self._publish(d.request_id, d)

    def _publish(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)
