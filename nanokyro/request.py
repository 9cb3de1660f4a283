"""Plain data about requests, and the messages the frontend and the engine core exchange: no torch, no xgrammar.

A request is `SamplingParams` (with an optional `StructuredOutput`) over prompt token ids. The core answers each
step with one `StepOutputs` message carrying every stream's new token ids (`SeqOutput`) and a stats snapshot; the
frontend (or the offline `LLM`) turns those into text `Delta`s. Everything here is a msgspec struct, so it crosses
the process boundary as msgpack, never pickle.
"""
from __future__ import annotations

import math

import msgspec

from nanokyro.tokenizer import TokenizerSpec

MAX_N = 128  # completions per request: each is a sequence, so n is bounded like a batch
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
KINDS = ("json", "regex", "grammar", "choice", "structural_tag")


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a constrained completion must be. Set exactly one field."""

    json: dict | str | bool | None = None  # a JSON schema (a dict or its text); True: any JSON object
    regex: str | None = None  # the whole output matches it
    grammar: str | None = None  # EBNF in llama.cpp's GBNF dialect, starting at the rule `root`
    choice: list[str] | None = None  # exactly one of these strings
    structural_tag: str | None = None  # an xgrammar structural tag as JSON text (how tool_choice is enforced)

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of {', '.join(KINDS)}; got {given}")
        kind = given[0]
        ok = {
            "json": isinstance(self.json, (dict, str)) or self.json is True,
            "regex": isinstance(self.regex, str),
            "grammar": isinstance(self.grammar, str),
            "choice": isinstance(self.choice, list) and bool(self.choice) and all(isinstance(c, str) for c in self.choice),
            "structural_tag": isinstance(self.structural_tag, str),
        }[kind]  # fmt: skip
        if not ok:
            want = {"json": "a schema (dict or JSON text) or True", "regex": "a string", "grammar": "a string",
                    "choice": "a non-empty list of strings", "structural_tag": "JSON text"}[kind]  # fmt: skip
            raise ValueError(f"structured output {kind} must be {want}, got {getattr(self, kind)!r}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


class SamplingParams(msgspec.Struct, kw_only=True):
    n: int = 1
    max_tokens: int | None = 16  # None: until EOS or the context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the k most likely
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # constrained decoding: JSON schema, regex, grammar, choice, tags
    lora: str | None = None  # the LoRA adapter (its registered name) to run under; None: the base model
    speculative: bool = True  # False: never speculate for this request (when the engine speculates at all)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured, dict):
            self.structured = StructuredOutput(**self.structured)
        self.verify()

    def verify(self) -> None:
        """Raise ValueError naming the offending field; the server turns it into a 400."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):  # inf would pass the range checks below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        checks = [
            (1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.top_k < 2**31, "top_k", "must be -1, 0 (off) or a positive count"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.seed is None or 0 <= self.seed <= 2**63 - self.n, "seed", "must be in [0, 2**63 - n]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # dividing by a tinier temperature would overflow to inf


class PromptError(ValueError):
    """The request can't be served as asked (too long, bad ids...). The server answers 400."""

    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


class UnknownAdapter(PromptError):
    """A request names a LoRA adapter that is not loaded. The server answers 404."""

    status = 404

    def __init__(self, name: str):
        super().__init__(f"the LoRA adapter {name!r} is not loaded", param="model")


class Limits(msgspec.Struct):
    """What a request must fit: learned by the frontend in the start-up handshake, so it can refuse a request
    without asking the core."""

    max_model_len: int
    vocab_size: int
    num_pages: int
    page_size: int

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError when the request can't fit."""
        n = len(prompt_ids)
        if n == 0:
            raise PromptError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise PromptError(f"prompt token ids must be in [0, {self.vocab_size})")
        if n >= self.max_model_len:
            raise PromptError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                              f"{n}, leaving no room for a completion")  # fmt: skip
        max_new = params.max_tokens or 1
        if n + max_new > self.max_model_len:
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n} and "
                f"max_tokens asks for {max_new} more ({n + max_new} in all)", param="max_tokens")
        if -(-(n + max_new) // self.page_size) > self.num_pages:
            raise PromptError(f"prompt + max_tokens = {n + max_new} tokens exceed the KV cache ({self.num_pages} "
                              "pages)", param="max_tokens")  # fmt: skip


# -- what the core reports --------------------------------------------------------------------------------------


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


class Failure(msgspec.Struct, array_like=True):
    status: int  # as an HTTP status: 400 the request is bad, 500 it hit a bug, 503 the engine is unhealthy
    message: str


class SeqOutput(msgspec.Struct, array_like=True, gc=False):
    """What one completion gained in one step of the core, or its end. A finishing token of a "stop" (EOS, a stop
    token, a grammar's end) or of an "abort" is in token_ids but is not text."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time: float = 0.0  # seconds the request waited before its first step
    error: Failure | None = None  # with finish_reason "error": what went wrong


class EngineStats(msgspec.Struct):
    """The core's state, published with every step: what /metrics shows of the engine."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    lora_requests: dict[str, int] = {}  # adapter name -> requests that used it, since start
    loras_resident: int = 0  # adapters in a device slot now
    lora_loads: int = 0  # adapters put into a device slot, since start
    spec_verify_steps: int = 0  # sequence-steps that verified drafts (speculative decoding)
    spec_draft_tokens: int = 0  # draft tokens proposed and verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_forced_tokens: int = 0  # of the draft tokens, those a grammar forced (structured outputs)
    spec_forced_accepted_tokens: int = 0  # of those, accepted


# -- what the frontend makes of it ------------------------------------------------------------------------------


class Delta(msgspec.Struct):
    """What one completion gained in one step (or its end), as text."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time: float = 0.0


class CompletionOutput(msgspec.Struct):
    index: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class RequestOutput(msgspec.Struct):
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


# -- messages between the frontend and the core -----------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str
    index: int | None = None  # one completion (a stop string ended it); None: all of them


class Shutdown(msgspec.Struct, tag=True):
    pass


class LoadAdapter(msgspec.Struct, tag=True):
    """Register a LoRA adapter (a PEFT directory) under a name; answered by an AdapterReply."""

    reply_id: int
    name: str
    path: str


class UnloadAdapter(msgspec.Struct, tag=True):
    reply_id: int
    name: str


ToCore = AddRequest | AbortRequest | Shutdown | LoadAdapter | UnloadAdapter


class Ready(msgspec.Struct, tag=True):
    """The handshake: the core loaded its model and serves it."""

    model_name: str
    limits: Limits
    tokenizer: TokenizerSpec | None
    adapters: dict[str, str] = {}  # the LoRA adapters registered at start: name -> path
    max_loras: int = 0  # 0: LoRA is off


class LoadFailed(msgspec.Struct, tag=True):
    message: str


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[SeqOutput]
    stats: EngineStats


class Unhealthy(msgspec.Struct, tag=True):
    """The core stopped stepping (repeated step failures, a device error); it refuses new requests."""

    message: str


class AdapterReply(msgspec.Struct, tag=True):
    """The answer to LoadAdapter / UnloadAdapter: an HTTP status (200, 400 bad adapter, 404 unknown, 409 in use),
    what went wrong, and the adapters registered after it."""

    reply_id: int
    status: int
    message: str
    adapters: dict[str, str]  # name -> path


FromCore = Ready | LoadFailed | StepOutputs | Unhealthy | AdapterReply
