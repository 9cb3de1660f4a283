"""The OpenAI-compatible HTTP API over an AsyncEngine, as a Litestar app.

Owns: turning a request (its bodies are in protocol.py; unknown fields are a 400) into prompt ids
and SamplingParams, streaming deltas as SSE chunks or collecting them into one answer, OpenAI-shaped errors,
the waiting-queue limit, API-key checks, /health, /metrics, and aborting a request the moment its client leaves.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import jinja2
import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response import Stream

from nanokyro.engine import AsyncEngine, Delta, EngineDead, TokenLogprob
from nanokyro.grammar import StructuredOutput
from nanokyro.metrics import CONTENT_TYPE, Metrics, RequestStats
from nanokyro.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    Completion, CompletionChoice, CompletionRequest, DeltaMessage, PromptTokensDetails, SamplingFields, Usage,
)  # fmt: skip
from nanokyro.sampler import SamplingParams

log = logging.getLogger("nanokyro.server")

MAX_QUEUE = 1000  # default limit on requests waiting for their first token
MAX_BODY_BYTES = 10 << 20
SHUTDOWN_GRACE_S = 10.0  # on SIGINT/SIGTERM, in-flight requests get this long to finish before they are aborted

# -- errors ----------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(_: Request, exc: APIError) -> Response:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_error(request: Request, exc: ValidationException) -> Response:
    # Litestar puts msgspec's message ("Object contains unknown field `x`", "Expected `int`, got `str`") in extra,
    # with the field as key, or "data" (the whole body) where msgspec names the field in the message.
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) else {}
    message, param = extra.get("message") or exc.detail, extra.get("key")
    if param == "data":
        named = re.search(r"field `([^`]+)`", message)
        param = named[1] if named else None
    if message == "'data'":  # no body at all
        message = "the request needs a JSON object as its body"
    return _api_error(request, APIError(400, message, param=param))


def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _api_error(request, APIError(exc.status_code, exc.detail, kind, code=codes.get(exc.status_code)))


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _api_error(request, APIError(500, f"internal error: {exc!r}", "server_error"))


def _engine_error(exc: Exception) -> APIError:
    """An exception from a request's stream, as the error its client sees."""
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), "service_unavailable", code="engine_dead")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), "server_error")


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


async def _compile(engine: AsyncEngine, params: SamplingParams, req: SamplingFields) -> None:
    """Compile a request's grammar in a worker thread, so neither the event loop nor the engine waits on it;
    compiled grammars are cached, so the engine's own validation then finds it ready."""
    if params.structured is not None:
        try:
            await asyncio.to_thread(engine.engine.grammars.compile, params.structured)
        except ValueError as e:
            field = "structured_outputs" if req.structured_outputs is not None else "response_format"
            raise APIError(400, str(e), param=field) from None


def _sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    structured = _structured(req)
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=_default(req.temperature, 1.0), top_p=_default(req.top_p, 1.0),
            top_k=_default(req.top_k, 0), min_p=_default(req.min_p, 0.0),
            repetition_penalty=_default(req.repetition_penalty, 1.0),
            presence_penalty=_default(req.presence_penalty, 0.0),
            frequency_penalty=_default(req.frequency_penalty, 0.0), seed=req.seed, stop=req.stop or [],
            ignore_eos=req.ignore_eos, logprobs=logprobs, structured=structured,
        )  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    logprobs = _default(req.top_logprobs, 0) if req.logprobs else None
    return _sampling_params(req, _default(req.max_completion_tokens, req.max_tokens), logprobs)


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


def _piece(engine: AsyncEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False) if engine.tokenizer else str(token_id)


def _chat_logprobs(engine: AsyncEngine, lps: list[TokenLogprob]) -> dict:
    def entry(token_id, logprob):
        token = _piece(engine, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}  # fmt: skip


def _completion_logprobs(engine: AsyncEngine, lps: list[TokenLogprob], text_offset: int) -> dict:
    tokens = [_piece(engine, lp.token_id) for lp in lps]
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_piece(engine, i): v for i, v in lp.top} for lp in lps],
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


def _head(prefix: str, engine: AsyncEngine) -> dict:
    """The fields every response and chunk of one request share."""
    return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=engine.model_name)


def _sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but exiting does not wait for it: Ctrl-C during a minutes-long load quits at once."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="nanokyro-load", daemon=True).start()
    return await future


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app ---------------------------------------------------------------------------------------------------


class _Server:
    """What the handlers share: the engine once loaded, its metrics, and the count of unstarted requests."""

    def __init__(self, api_key: str | None, max_queue: int):
        self.api_key, self.max_queue = api_key, max_queue
        self.engine: AsyncEngine | None = None
        self.metrics: Metrics | None = None
        self.num_unstarted = 0  # requests taken but still waiting for their first token
        self.load_error: BaseException | None = None
        self._load_task: asyncio.Task | None = None

    # -- lifecycle

    def start(self, engine: AsyncEngine) -> None:
        engine.start()
        self.metrics, self.engine = Metrics(engine), engine

    def start_loading(self, make_engine: Callable[[], AsyncEngine]) -> None:
        self._load_task = asyncio.create_task(self._load(make_engine))

    async def _load(self, make_engine: Callable[[], AsyncEngine]) -> None:
        try:
            self.start(await _in_daemon_thread(make_engine))
        except Exception as e:
            log.exception("loading the model failed")
            self.load_error = e

    async def shutdown(self) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
        if self.engine is not None:
            await self.engine.shutdown(SHUTDOWN_GRACE_S)

    # -- per request checks

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None:
            message = f"the model failed to load: {self.load_error!r}" if self.load_error else "the model is loading"
            raise APIError(503, message, "service_unavailable", code="model_loading")
        if not self.engine.healthy:
            raise APIError(503, f"the engine loop is not running: {self.engine.error!r}", "service_unavailable",
                           code="engine_dead")  # fmt: skip
        return self.engine

    def admit(self, req: SamplingFields) -> AsyncEngine:
        """The checks every generation request goes through before its own; returns the engine to use."""
        engine = self.ready_engine()
        if req.model != engine.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.num_unstarted > self.max_queue:
            raise APIError(429, f"{self.num_unstarted} requests are already waiting (limit {self.max_queue})",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        return engine

    # -- generation

    async def generate(self, jobs: list[_Job], request_id: str) -> AsyncIterator[tuple[int, Delta]]:
        """Every job's deltas as they come, as (job number, delta). Closing this aborts whatever is unfinished."""
        out: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(job, f"{request_id}-{k}", k, out)) for k, job in enumerate(jobs)]
        try:
            for _ in range(len(jobs)):
                while (item := await out.get()) is not None:
                    if isinstance(item, Exception):
                        raise _engine_error(item)
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, job: _Job, request_id: str, k: int, out: asyncio.Queue) -> None:
        stats = RequestStats()
        self.num_unstarted += 1
        started = False
        try:
            async for d in self.engine.generate(job.prompt_ids, job.params, request_id):
                if not started:
                    started, self.num_unstarted = True, self.num_unstarted - 1
                stats.add(d)
                out.put_nowait((k, d))
            out.put_nowait(None)
        except Exception as e:
            out.put_nowait(e)
        finally:
            if not started:
                self.num_unstarted -= 1
            self.metrics.observe(stats, job.params.n)

    async def collect(self, request: Request, jobs: list[_Job], request_id: str) -> tuple[list[_Choice], Usage]:
        """Every choice whole, for a non-streaming answer. A client that hangs up first aborts the work."""

        async def work():
            choices, usage = [_Choice() for _ in range(sum(job.params.n for job in jobs))], _Usage(jobs)
            async for k, d in self.generate(jobs, request_id):
                usage.add(k, d)
                choices[jobs[k].first_index + d.index].add(d)
            return choices, usage.body()

        task, gone = asyncio.ensure_future(work()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            task.cancel()
        if not task.done() or task.cancelled():
            raise APIError(499, "the client disconnected")  # nobody is left to read this
        return task.result()

    async def sse(self, jobs: list[_Job], request_id: str, opening: list, chunk: Callable[[int, Delta], Any],
                  usage_chunk: Callable[[Usage], Any] | None) -> AsyncIterator[bytes]:  # fmt: skip
        """The SSE body: `opening` chunks, one chunk per delta (chunk(choice index, delta)): each step's token, even
        one whose text is not out yet (mid-character, or a model without a tokenizer), the usage chunk if asked
        for, then [DONE]; an error ends the stream with an error event."""
        usage = _Usage(jobs)
        try:
            for c in opening:
                yield _sse(c)
            async for k, d in self.generate(jobs, request_id):
                usage.add(k, d)
                yield _sse(chunk(jobs[k].first_index + d.index, d))
            if usage_chunk is not None:
                yield _sse(usage_chunk(usage.body()))
            yield b"data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())

    # -- the two endpoints

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        engine, params = self.admit(req), _chat_params(req)
        await _compile(engine, params, req)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        try:
            messages = [msgspec.to_builtins(m) for m in req.messages]
            jobs = [_Job(engine.prepare(engine.tokenizer.encode_chat(messages), params), params, 0)]
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, str(e), param="messages") from None
        head = _head("chatcmpl", engine)

        def logprobs(lps):
            return _chat_logprobs(engine, lps) if lps is not None else None

        if req.stream:
            def chunk(i: int, d: Delta) -> ChatCompletionChunk:
                delta = DeltaMessage(content=d.text or None)
                return ChatCompletionChunk(**head, choices=[ChatChunkChoice(i, delta, logprobs(d.logprobs),
                                                                            d.finish_reason)])  # fmt: skip

            roles = [ChatCompletionChunk(**head, choices=[ChatChunkChoice(i, DeltaMessage("assistant", ""))])
                     for i in range(params.n)]  # fmt: skip
            usage = _usage_chunk(req, lambda u: ChatCompletionChunk(**head, choices=[], usage=u))
            return Stream(self.sse(jobs, head["id"], roles, chunk, usage), media_type="text/event-stream")
        choices, usage = await self.collect(request, jobs, head["id"])
        return Response(ChatCompletion(**head, usage=usage, choices=[
            ChatChoice(i, AssistantMessage(c.text), logprobs(c.logprobs), c.finish_reason)
            for i, c in enumerate(choices)]))  # fmt: skip

    async def complete(self, req: CompletionRequest, request: Request) -> Response:
        engine, params = self.admit(req), _completion_params(req)
        await _compile(engine, params, req)
        try:
            prompt_ids = [engine.prepare(p, params) for p in _prompts(req.prompt)]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        jobs = [_Job(ids, params, k * params.n) for k, ids in enumerate(prompt_ids)]
        head = _head("cmpl", engine)
        offsets = [0] * (len(jobs) * params.n)  # where each choice's next text starts, for logprobs.text_offset

        def choice(i: int, text: str, lps, finish_reason) -> CompletionChoice:
            logprobs = _completion_logprobs(engine, lps, offsets[i]) if lps is not None else None
            offsets[i] += len(text)
            return CompletionChoice(i, text, logprobs, finish_reason)

        if req.stream:
            def chunk(i: int, d: Delta) -> Completion:
                return Completion(**head, choices=[choice(i, d.text, d.logprobs, d.finish_reason)])

            usage = _usage_chunk(req, lambda u: Completion(**head, choices=[], usage=u))
            return Stream(self.sse(jobs, head["id"], [], chunk, usage), media_type="text/event-stream")
        choices, usage = await self.collect(request, jobs, head["id"])
        return Response(Completion(**head, usage=usage, choices=[
            choice(i, c.text, c.logprobs, c.finish_reason) for i, c in enumerate(choices)]))  # fmt: skip


def _usage_chunk(req: SamplingFields, make: Callable[[Usage], Any]) -> Callable[[Usage], Any] | None:
    return make if req.stream_options is not None and req.stream_options.include_usage else None


def create_app(engine: AsyncEngine | Callable[[], AsyncEngine], *, api_key: str | None = None,
               max_queue: int = MAX_QUEUE) -> Litestar:  # fmt: skip
    """The app serving `engine`, which starts with the app. Pass a function that builds the engine instead to
    answer /health with 503 while the model loads in the background.

    api_key: required as `Authorization: Bearer <key>` on /v1 routes. max_queue: answer 429 while more than this
    many requests wait for their first token.
    """
    server = _Server(api_key, max_queue)

    async def on_startup() -> None:
        if isinstance(engine, AsyncEngine):
            server.start(engine)
        else:
            server.start_loading(engine)

    def check_key(connection, _) -> None:
        server.check_api_key(connection)

    @post("/chat/completions", status_code=200, responses={200: ResponseSpec(
        ChatCompletion, description="The completion, or with stream: an SSE stream of chat.completion.chunk")})
    async def chat_completions(data: JSONBody[ChatCompletionRequest], request: Request) -> Response:
        return await server.chat(data, request)

    @post("/completions", status_code=200, responses={200: ResponseSpec(
        Completion, description="The completion, or with stream: an SSE stream of text_completion chunks")})
    async def completions(data: JSONBody[CompletionRequest], request: Request) -> Response:
        return await server.complete(data, request)

    @get("/models")
    async def models() -> dict:
        engine = server.ready_engine()
        model = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "nanokyro",
                 "max_model_len": engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [model]}

    @get("/health")
    async def health() -> Response:
        server.ready_engine()
        return Response(b"", status_code=200)

    @get("/metrics")
    async def metrics() -> Response:
        body = server.metrics.render() if server.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    v1 = Router("/v1", route_handlers=[chat_completions, completions, models], guards=[check_key])
    return Litestar(
        route_handlers=[v1, health, metrics],
        on_startup=[on_startup],
        on_shutdown=[server.shutdown],
        state=State({"server": server}),  # serve.py and tests look at server.engine
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,  # logging is the application's to configure (serve.py does)
        exception_handlers={APIError: _api_error, ValidationException: _validation_error,
                            HTTPException: _http_error, Exception: _internal_error},  # fmt: skip
    )


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An app served by uvicorn on a free loopback port, in a thread with its own event loop: how tests and
    `bench.py --serve` run a real server beside their own code."""

    def __init__(self, app, start_timeout_s: float = 60.0):
        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
