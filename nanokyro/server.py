"""The OpenAI-compatible HTTP API, as a Litestar app in the frontend process, over an engine core in a process of
its own (client.py).

Owns: assembling the app; turning a request (its bodies are in protocol.py; unknown fields and loosely typed values
are a 400) into prompt ids and SamplingParams, off the event loop; streaming deltas as SSE chunks or collecting them
into one answer; the waiting-queue limit; API-key checks; /v1/models, /health, /metrics; aborting a request the
moment its client leaves; and the graceful shutdown (in-flight streams get a grace period, then end with an error
event). OpenAI-shaped errors and strict body decoding are api_errors.py's; vLLM's /tokenize and /detokenize
tokenize_api.py's; its LoRA load/unload routes lora_api.py's; function calling's formats, grammars and parsing
tool_calls.py's; the OpenAPI document's corrections openapi.py's; running the app under uvicorn uvicorn_server.py's.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Callable

import jinja2
import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, PathParameter
from litestar.response import Stream

from nanokyro import lora_api, tokenize_api
from nanokyro.api_errors import EXCEPTION_HANDLERS, APIError, engine_error, strict, unavailable
from nanokyro.client import CORE_ENTRY, CoreClient, EngineDead, RequestFailed
from nanokyro.config import EngineConfig
from nanokyro.metrics import CONTENT_TYPE, Metrics, RequestStats
from nanokyro.openapi import TITLE, VERSION, DocumentPlugin
from nanokyro.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    Completion, CompletionChoice, CompletionRequest, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
    PromptTokensDetails, SamplingFields, StreamOptions, ToolCall, Usage,
)  # fmt: skip
from nanokyro.request import Delta, PromptError, SamplingParams, StructuredOutput, TokenLogprob
from nanokyro.tool_calls import ToolCallParser, ToolUse
from nanokyro.tool_calls import parse as parse_tool_calls
# Where uvicorn serves the app; re-exported here for the code that has always imported them from this module.
from nanokyro.uvicorn_server import BackgroundServer, UvicornServer, free_port  # noqa: F401

log = logging.getLogger("nanokyro.server")

MAX_QUEUE = 1000  # default limit on requests waiting for their first token
MAX_BODY_BYTES = 10 << 20

# -- requests to engine calls ----------------------------------------------------------------------------------


@dataclass
class _Job:
    """One engine request: one prompt and its n completions, which are choices first_index .. first_index+n-1."""

    prompt_ids: list[int]
    params: SamplingParams
    first_index: int


def _default(value, default):
    return default if value is None else value


def _structured(req: SamplingFields) -> StructuredOutput | None:
    """response_format (OpenAI) or structured_outputs (vLLM) as the engine's constraint."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and so is not None and fmt.type != "text":
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if so is not None:
            return StructuredOutput(**{f: v for f in so.__struct_fields__ if (v := getattr(so, f)) is not None})
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutput(json=True)
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return StructuredOutput(json=fmt.json_schema.schema)
    except ValueError as e:
        raise APIError(400, str(e), param="response_format" if so is None else "structured_outputs") from None


def _sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                     tools: ToolUse | None = None) -> SamplingParams:  # fmt: skip
    structured = _structured(req)
    if tools is not None and tools.calls_expected:
        if structured is None:
            structured = StructuredOutput(structural_tag=tools.grammar())
        elif tools.choice != "auto":  # "auto" leaves the client's own constraint in charge, calls parsed freely
            raise APIError(400, f"tool_choice {tools.choice!r} constrains the output itself: it can't be combined "
                           "with response_format or structured_outputs", param="tool_choice")  # fmt: skip
    if req.temperature is not None and req.temperature > 2:  # the OpenAI API's range; the engine takes any
        raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=_default(req.temperature, 1.0), top_p=_default(req.top_p, 1.0),
            top_k=_default(req.top_k, 0), min_p=_default(req.min_p, 0.0),
            repetition_penalty=_default(req.repetition_penalty, 1.0),
            presence_penalty=_default(req.presence_penalty, 0.0),
            frequency_penalty=_default(req.frequency_penalty, 0.0), seed=req.seed, stop=req.stop or [],
            ignore_eos=req.ignore_eos, logprobs=logprobs, structured=structured, speculative=req.speculative,
        )  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _chat_params(req: ChatCompletionRequest, tools: ToolUse | None) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    logprobs = _default(req.top_logprobs, 0) if req.logprobs else None
    return _sampling_params(req, _default(req.max_completion_tokens, req.max_tokens), logprobs, tools)


def _tool_use(req: ChatCompletionRequest, format_name: str) -> ToolUse | None:
    tools = msgspec.to_builtins(req.tools) if req.tools else None
    choice = msgspec.to_builtins(req.tool_choice)
    try:
        return ToolUse.from_request(tools, choice, req.parallel_tool_calls, format_name)
    except ValueError as e:
        param, message = str(e).split(": ", 1)
        raise APIError(400, message, param=param) from None


def _tool_calls(calls: list[dict]) -> list[ToolCall]:
    return [ToolCall(c["id"], "function", FunctionCall(**c["function"])) for c in calls]


def _tool_call_deltas(deltas: list[dict]) -> list[DeltaToolCall] | None:
    return [DeltaToolCall(d["index"], d.get("id"), d.get("type"), DeltaFunctionCall(**d["function"]))
            for d in deltas] or None  # fmt: skip


def _finish_reason(reason: str | None, num_calls: int) -> str | None:
    return "tool_calls" if num_calls and reason == "stop" else reason


def _completion_params(req: CompletionRequest) -> SamplingParams:
    return _sampling_params(req, _default(req.max_tokens, 16), req.logprobs)  # 16: the OpenAI default


def _prompts(prompt) -> list[str | list[int]]:
    """The completions API's four prompt shapes, as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   param="prompt")  # fmt: skip


def _piece(client: CoreClient, token_id: int) -> str:
    return client.tokenizer.decode([token_id], skip_special_tokens=False) if client.tokenizer else str(token_id)


def _chat_logprobs(client: CoreClient, lps: list[TokenLogprob]) -> dict:
    def entry(token_id, logprob):
        token = _piece(client, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}  # fmt: skip


def _completion_logprobs(client: CoreClient, lps: list[TokenLogprob], text_offset: int) -> dict:
    tokens = [_piece(client, lp.token_id) for lp in lps]
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_piece(client, i): v for i, v in lp.top} for lp in lps],
        "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset)),
    }


@dataclass
class _Choice:
    """A completion being collected for a non-streaming answer."""

    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        self.finish_reason = d.finish_reason or self.finish_reason


class _Usage:
    def __init__(self, jobs: list[_Job]):
        self.prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
        self.cached = [0] * len(jobs)
        self.completion_tokens = 0

    def add(self, k: int, d: Delta) -> None:
        self.completion_tokens += len(d.token_ids)
        if d.index == 0:
            self.cached[k] = d.num_cached_tokens

    def body(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens,
                     PromptTokensDetails(sum(self.cached)))  # fmt: skip


def _head(prefix: str, model: str) -> dict:
    """The fields every response and chunk of one request share; `model` as the request named it (the base model,
    an adapter, or `base:adapter`)."""
    return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable) -> Any:
    """Await, unless the client hangs up first: then the work is cancelled (which aborts its requests)."""
    task, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its cleanup (the abort) done before we go on
    if task.cancelled():
        raise APIError(499, "the client disconnected")  # nobody is left to read this
    return task.result()


class _Admission:
    """A request counted against the waiting-queue limit from the moment it is admitted (before any await, so a
    burst can't slip past the check) until its first token, its end, or its failure."""

    def __init__(self, server: _Server, lora: str | None = None):
        self.server, self.lora = server, lora  # lora: the adapter the request's `model` names, if any
        server.num_unstarted += 1

    def started(self) -> None:
        if self.server is not None:
            self.server.num_unstarted -= 1
            self.server = None


# -- the app ---------------------------------------------------------------------------------------------------


class _Server:
    """What the handlers share: the core client once started, the metrics, and the count of unstarted requests."""

    def __init__(self, cfg: EngineConfig, api_key: str | None, max_queue: int, core_entry: str,
                 tool_call_parser: str | None):  # fmt: skip
        self.cfg, self.api_key, self.max_queue, self.core_entry = cfg, api_key, max_queue, core_entry
        self.tool_call_parser = tool_call_parser  # None: the format the chat template suggests
        self.client: CoreClient | None = None
        self.metrics: Metrics | None = None
        self.num_unstarted = 0  # requests admitted but still waiting for their first token
        self.max_prompt_chars = 0  # a string prompt longer than this can't fit the context, whatever its tokens
        self.load_error: BaseException | None = None
        self.draining = False  # shutting down: no new requests
        self._load_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    # -- lifecycle

    async def _load(self) -> None:
        try:
            client = await CoreClient.start(self.cfg, self.core_entry)
        except Exception as e:
            log.error("loading the model failed: %s", e)
            self.load_error = e
            return
        if client.tokenizer is not None:
            longest = max(len(t) for t in client.tokenizer.tokenizer.get_vocab())
            self.max_prompt_chars = 2 * longest * client.limits.max_model_len  # 2x: a margin, never a false refusal
        self.metrics, self.client = Metrics(client), client

    def start_loading(self) -> None:
        self._load_task = asyncio.create_task(self._load())

    def begin_shutdown(self, grace_s: float) -> asyncio.Task:
        """Stop admitting; in-flight requests get grace_s to finish, then end with an error. Returns that drain."""
        if self._drain_task is None:
            self.draining = True
            self._drain_task = asyncio.create_task(self._end_streams_after(grace_s))
        return self._drain_task

    async def _end_streams_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self.client is not None and self.client.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.client is not None and self.client.num_streams:
            log.warning("shutdown: ending %d requests still running after the %.0f s grace period",
                        self.client.num_streams, grace_s)  # fmt: skip
            self.client.end_all("the server is shutting down")

    async def shutdown(self) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)  # a core still loading is killed
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self.client is not None:
            await self.client.close()

    # -- per request checks

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def ready_client(self) -> CoreClient:
        if self.client is None:
            if self.load_error is not None:
                raise unavailable(f"the model failed to load: {self.load_error}", "model_load_failed")
            raise unavailable("the model is loading", "model_loading")
        if self.client.error is not None:
            raise unavailable(self.client.error, "engine_dead")
        if self.draining:
            raise unavailable("the server is shutting down", "shutting_down")
        return self.client

    def admit(self, req: SamplingFields) -> tuple[CoreClient, _Admission]:
        """The checks every generation request goes through before its own; counts it as waiting."""
        client = self.ready_client()
        lora = self.lora_of(client, req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.num_unstarted >= self.max_queue:
            raise APIError(429, f"{self.num_unstarted} requests are already waiting (limit {self.max_queue})",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        return client, _Admission(self, lora)

    def model_names(self) -> list[str] | None:
        """What a request's `model` may name: the served model, its adapters and `base:adapter` (None: loading)."""
        client = self.client
        if client is None:
            return None
        return [client.model_name, *client.adapters, *(f"{client.model_name}:{a}" for a in client.adapters)]

    def lora_of(self, client: CoreClient, model: str) -> str | None:
        """The LoRA adapter a request's `model` names (the adapter's name, or `base:adapter`), None for the base
        model; 404 for anything else."""
        if model == client.model_name:
            return None
        name = model.removeprefix(f"{client.model_name}:")
        if name in client.adapters:
            return name
        served = [client.model_name, *client.adapters]
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")  # fmt: skip

    async def encode(self, client: CoreClient, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Prompt ids, tokenised on a worker thread (a long prompt must not stall other streams), and validated
        against the limits the core gave at start-up."""
        if isinstance(prompt, str):
            if client.tokenizer is None:
                raise PromptError("this model has no tokenizer (dummy weights): send token ids")
            self.check_length(len(prompt))
            prompt = await asyncio.to_thread(client.tokenizer.encode, prompt)
        client.limits.validate(prompt, params)
        return prompt

    def check_length(self, num_chars: int) -> None:
        if num_chars > self.max_prompt_chars:
            raise PromptError(f"the prompt ({num_chars} characters) is longer than this model's context of "
                              f"{self.client.limits.max_model_len} tokens can hold")  # fmt: skip

    # -- generation

    async def generate(self, jobs: list[_Job], request_id: str, admission: _Admission
                       ) -> AsyncIterator[list[tuple[int, Delta]]]:  # fmt: skip
        """Every job's deltas as they come, a batch at a time, as (job number, delta). Closing this aborts whatever
        is unfinished; the request's metrics are recorded at its end."""
        streams = [self.client.generate(job.prompt_ids, job.params, f"{request_id}-{k}") for k, job in enumerate(jobs)]
        stats = [RequestStats() for _ in jobs]
        try:
            async for k, batch in _merge(streams):
                admission.started()
                stats[k].add(batch)
                yield [(k, d) for d in batch]
        except (EngineDead, RequestFailed) as e:
            raise engine_error(e) from None
        finally:
            admission.started()
            for s in streams:
                await s.aclose()
            for s, job in zip(stats, jobs):
                self.metrics.observe(s, job.params.n)

    async def collect(self, request: Request, jobs: list[_Job], request_id: str, admission: _Admission
                      ) -> tuple[list[_Choice], Usage]:  # fmt: skip
        """Every choice whole, for a non-streaming answer. A client that hangs up first aborts the work."""

        async def work():
            choices, usage = [_Choice() for _ in range(sum(job.params.n for job in jobs))], _Usage(jobs)
            async for batch in self.generate(jobs, request_id, admission):
                for k, d in batch:
                    usage.add(k, d)
                    choices[jobs[k].first_index + d.index].add(d)
            return choices, usage.body()

        return await _unless_disconnected(request, work())

    async def stream(self, request: Request, jobs: list[_Job], request_id: str, admission: _Admission, opening: list,
                     chunk: Callable[[int, Delta], Any], usage_chunk: Callable[[Usage], Any],
                     options: StreamOptions | None) -> Stream:  # fmt: skip
        """An SSE response: `opening` chunks, one chunk per delta (chunk(choice index, delta)): each step's token,
        even one whose text is not out yet (mid-character, or a model without a tokenizer), the usage chunk if asked
        for (with continuous_usage_stats, the usage so far in every chunk too), then [DONE]. What arrived together
        is sent in one write. The response starts once the first tokens are in, so a request the core refuses (an
        invalid grammar) is still an HTTP error; a later error ends the stream with an error event and [DONE]."""
        usage = _Usage(jobs)
        continuous = options is not None and options.continuous_usage_stats
        deltas = self.generate(jobs, request_id, admission)
        try:
            first = await _unless_disconnected(request, anext(deltas))  # a long wait in the queue, perhaps
        except BaseException:
            await deltas.aclose()
            raise

        def body(batch) -> bytes:
            chunks = []
            for k, d in batch:
                usage.add(k, d)
                chunks.append(c := chunk(jobs[k].first_index + d.index, d))
                if continuous:
                    c.usage = usage.body()
            return b"".join(map(_sse, chunks))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"".join(_sse(c) for c in opening) + body(first)
                async for batch in deltas:
                    yield body(batch)
                if options is not None and options.include_usage:
                    yield _sse(usage_chunk(usage.body()))
                yield b"data: [DONE]\n\n"
            except APIError as e:
                yield _sse(e.body()) + b"data: [DONE]\n\n"
            finally:
                await deltas.aclose()

        return Stream(events(), media_type="text/event-stream")

    # -- the two endpoints

    async def handle(self, request: Request, body_type: type, respond: Callable) -> Response:
        """Decode the body strictly, admit the request (counted as waiting until generation takes it over), and
        answer it with `respond` (chat or complete)."""
        req = await strict(request, body_type)
        client, admission = self.admit(req)
        try:
            return await respond(req, request, client, admission)
        finally:
            admission.started()  # a no-op once generation took it over

    async def chat(self, req: ChatCompletionRequest, request: Request, client: CoreClient, admission: _Admission):
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if client.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        for i, m in enumerate(req.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise APIError(400, f"messages[{i}] has no content", param="messages")
        tools = _tool_use(req, self.tool_call_parser or client.tokenizer.tool_format)
        params = msgspec.structs.replace(_chat_params(req, tools), lora=admission.lora)
        messages = [msgspec.to_builtins(m) for m in req.messages]
        prompt_tools = tools.prompt_tools() if tools else None
        try:
            self.check_length(len(msgspec.json.encode([messages, prompt_tools])))
            prompt_ids = await asyncio.to_thread(client.tokenizer.encode_chat, messages, tools=prompt_tools,
                                                 tool_format=tools.format.name if tools else None)  # fmt: skip
            client.limits.validate(prompt_ids, params)
        except PromptError as e:
            raise APIError(400, str(e), param="messages" if e.param == "prompt" else e.param) from None
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        jobs = [_Job(prompt_ids, params, 0)]
        head = _head("chatcmpl", req.model)
        parsing = tools is not None and tools.calls_expected

        def logprobs(lps):
            return _chat_logprobs(client, lps) if lps is not None else None

        if req.stream:
            parsers = [ToolCallParser(tools.format) for _ in range(params.n)] if parsing else None

            def chunk(i: int, d: Delta) -> ChatCompletionChunk:
                text, calls, reason = d.text, [], d.finish_reason
                if parsers:
                    text, calls = parsers[i].feed(text)
                    if reason is not None:
                        more, last = parsers[i].finish()
                        text, calls = text + more, calls + last
                    reason = _finish_reason(reason, parsers[i].num_calls)
                delta = DeltaMessage(content=text or None, tool_calls=_tool_call_deltas(calls))
                return ChatCompletionChunk(**head, choices=[ChatChunkChoice(i, delta, logprobs(d.logprobs), reason)])

            roles = [ChatCompletionChunk(**head, choices=[ChatChunkChoice(i, DeltaMessage("assistant", ""))])
                     for i in range(params.n)]  # fmt: skip
            usage = lambda u: ChatCompletionChunk(**head, choices=[], usage=u)  # noqa: E731
            return await self.stream(request, jobs, head["id"], admission, roles, chunk, usage, req.stream_options)
        choices, usage = await self.collect(request, jobs, head["id"], admission)

        answers = []
        for i, c in enumerate(choices):
            content, calls = parse_tool_calls(c.text, tools.format) if parsing else (c.text, [])
            answers.append(ChatChoice(i, AssistantMessage(content, tool_calls=_tool_calls(calls) or None),
                                      logprobs(c.logprobs), _finish_reason(c.finish_reason, len(calls))))
        return Response(ChatCompletion(**head, usage=usage, choices=answers))

    async def complete(self, req: CompletionRequest, request: Request, client: CoreClient, admission: _Admission):
        params = msgspec.structs.replace(_completion_params(req), lora=admission.lora)
        try:
            prompt_ids = [await self.encode(client, p, params) for p in _prompts(req.prompt)]
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from None
        jobs = [_Job(ids, params, k * params.n) for k, ids in enumerate(prompt_ids)]
        head = _head("cmpl", req.model)
        offsets = [0] * (len(jobs) * params.n)  # where each choice's next text starts, for logprobs.text_offset

        def choice(i: int, text: str, lps, finish_reason) -> CompletionChoice:
            logprobs = _completion_logprobs(client, lps, offsets[i]) if lps is not None else None
            offsets[i] += len(text)
            return CompletionChoice(i, text, logprobs, finish_reason)

        if req.stream:
            def chunk(i: int, d: Delta) -> Completion:
                return Completion(**head, choices=[choice(i, d.text, d.logprobs, d.finish_reason)])

            usage = lambda u: Completion(**head, choices=[], usage=u)  # noqa: E731
            return await self.stream(request, jobs, head["id"], admission, [], chunk, usage, req.stream_options)
        choices, usage = await self.collect(request, jobs, head["id"], admission)
        return Response(Completion(**head, usage=usage, choices=[
            choice(i, c.text, c.logprobs, c.finish_reason) for i, c in enumerate(choices)]))  # fmt: skip

async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, as (iterator number, item); one iterator is read directly."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                out.put_nowait((k, item))
            out.put_nowait(None)
        except BaseException as e:
            out.put_nowait(e)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        for _ in streams:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each stream's own cleanup (its abort) has run


def create_app(cfg: EngineConfig, *, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               core_entry: str = CORE_ENTRY, tool_call_parser: str | None = None) -> Litestar:  # fmt: skip
    """The app serving the model `cfg` names. Its engine core starts in a process of its own with the app, and
    /health answers 503 while the model loads.

    api_key: required as `Authorization: Bearer <key>` on /v1 routes, /tokenize and /detokenize. max_queue: answer 429 while this many requests
    wait for their first token. core_entry: "module:function" run in the core process (core_process.run_core).
    tool_call_parser: the format tool calls are read in (tool_calls.FORMATS); default: picked from the chat template.
    """
    server = _Server(cfg, api_key, max_queue, core_entry, tool_call_parser)

    def check_key(connection, _) -> None:
        server.check_api_key(connection)

    # `data` documents the body in the OpenAPI schema and reads it; the handlers decode it again, strictly.
    @post("/chat/completions", status_code=200, responses={200: ResponseSpec(
        ChatCompletion, description="The completion, or with stream: an SSE stream of chat.completion.chunk")})
    async def chat_completions(data: JSONBody[ChatCompletionRequest], request: Request) -> Response:
        return await server.handle(request, ChatCompletionRequest, server.chat)

    @post("/completions", status_code=200, responses={200: ResponseSpec(
        Completion, description="The completion, or with stream: an SSE stream of text_completion chunks")})
    async def completions(data: JSONBody[CompletionRequest], request: Request) -> Response:
        return await server.handle(request, CompletionRequest, server.complete)

    def model_cards() -> list[dict]:
        """The base model, then its LoRA adapters (vLLM's fields: `root` the adapter's path, `parent` the base)."""
        client = server.ready_client()
        base = {"id": client.model_name, "object": "model", "created": 0, "owned_by": "nanokyro",
                "max_model_len": client.limits.max_model_len}  # fmt: skip
        return [base] + [{**base, "id": name, "root": path, "parent": client.model_name}
                         for name, path in client.adapters.items()]  # fmt: skip

    @get("/models")
    async def models() -> dict:
        return {"object": "list", "data": model_cards()}

    @get("/models/{model_id:path}")
    async def model(model_id: Annotated[str, PathParameter()]) -> dict:
        cards = model_cards()
        card = next((c for c in cards if c["id"] == model_id.lstrip("/")), None)
        if card is None:
            raise APIError(404, f"the model {model_id.lstrip('/')!r} does not exist; this server serves "
                           f"{[c['id'] for c in cards]}", param="model", code="model_not_found")  # fmt: skip
        return card

    @get("/health")
    async def health() -> Response:
        server.ready_client()
        return Response(b"", status_code=200, media_type="text/plain")

    @get("/metrics")
    async def metrics() -> Response:
        body = server.metrics.render() if server.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    v1 = Router("/v1", route_handlers=[chat_completions, completions, models, model, *lora_api.routes(server)],
                guards=[check_key])  # fmt: skip
    tokens = Router("/", route_handlers=tokenize_api.routes(server), guards=[check_key])  # where vLLM serves them
    return Litestar(
        route_handlers=[v1, tokens, health, metrics],
        on_startup=[server.start_loading],
        on_shutdown=[server.shutdown],
        state=State({"server": server}),  # serve.py and tests look at server.client
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title=TITLE, version=VERSION, render_plugins=[DocumentPlugin(
            server.model_names, api_key is not None)]),
        logging_config=None,  # logging is the application's to configure (serve.py does)
        exception_handlers=EXCEPTION_HANDLERS,
    )
