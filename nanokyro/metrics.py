"""Prometheus metrics: per-request latencies and token counts fed by the server as each request streams, and
engine state (running/waiting, KV-cache use, preemptions, prefix-cache tokens, speculative decoding's drafts)
from the last stats snapshot the engine core published, read at scrape time.

Every metric lives in the engine's own registry, is named `nanokyro_*` in base units (seconds, tokens, a 0..1
ratio) and carries a `model_name` label.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanokyro.client import CoreClient
from nanokyro.request import Delta

CONTENT_TYPE = "text/plain; version=0.0.4"  # Litestar adds "; charset=utf-8" to text types itself

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass
class RequestStats:
    """One engine request's timeline (all its n completions), fed delta by delta."""

    start: float = field(default_factory=time.monotonic)  # when the server took the request
    num_prompt_tokens: int = 0
    num_generated: int = 0
    queue_time: float | None = None
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # completion index -> when its last token came
    gaps: list[float] = field(default_factory=list)  # time between consecutive tokens of a completion
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def add(self, deltas: list[Delta]) -> None:
        """The deltas that arrived together."""
        now = time.monotonic()
        for d in deltas:
            self.num_prompt_tokens = d.num_prompt_tokens
            if self.queue_time is None:
                self.queue_time = d.queue_time
            if d.token_ids:
                self.num_generated += len(d.token_ids)
                self.first_token = self.first_token or now
                if d.index in self.last_token:
                    self.gaps.append(now - self.last_token[d.index])
                self.last_token[d.index] = now
            if d.finish_reason:
                self.finish_reasons[d.index] = d.finish_reason


class Metrics:
    def __init__(self, client: CoreClient):
        self.registry = CollectorRegistry()
        self.model_name = client.model_name
        labels, reg = ["model_name"], self.registry

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, registry=reg, buckets=buckets).labels(self.model_name)

        self.ttft = histogram("nanokyro_time_to_first_token_seconds", "Time from request to its first token.",
                              _LATENCY_BUCKETS)  # fmt: skip
        self.tbt = histogram("nanokyro_time_between_tokens_seconds", "Time between consecutive tokens of a completion.",
                             _LATENCY_BUCKETS)  # fmt: skip
        self.e2e = histogram("nanokyro_e2e_request_latency_seconds", "Time from request to its end.", _LATENCY_BUCKETS)
        self.queue = histogram("nanokyro_request_queue_time_seconds", "Time a request waited before its first step.",
                               _LATENCY_BUCKETS)  # fmt: skip
        self.prompt_len = histogram("nanokyro_request_prompt_tokens", "Prompt length of each request.", _TOKEN_BUCKETS)
        self.gen_len = histogram("nanokyro_request_generation_tokens", "Tokens generated for each request (all n).",
                                 _TOKEN_BUCKETS)  # fmt: skip
        self.prompt_tokens = Counter("nanokyro_prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=reg).labels(self.model_name)  # fmt: skip
        self.generation_tokens = Counter("nanokyro_generation_tokens", "Tokens generated.", labels,
                                         registry=reg).labels(self.model_name)  # fmt: skip
        self.finished = Counter("nanokyro_request_finished", "Completions finished, by reason (stop, length, abort).",
                                [*labels, "finish_reason"], registry=reg)  # fmt: skip
        reg.register(_EngineCollector(client))

    def observe(self, stats: RequestStats, n: int) -> None:
        """Record a request that ended (finished, failed or abandoned). n: its number of completions."""
        self.e2e.observe(time.monotonic() - stats.start)
        if stats.queue_time is not None:
            self.queue.observe(stats.queue_time)
        if stats.first_token is not None:
            self.ttft.observe(stats.first_token - stats.start)
        for gap in stats.gaps:
            self.tbt.observe(gap)
        self.prompt_len.observe(stats.num_prompt_tokens)
        self.gen_len.observe(stats.num_generated)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generated)
        for i in range(n):  # a completion that never finished was abandoned by its client
            self.finished.labels(self.model_name, stats.finish_reasons.get(i, "abort")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state, read when Prometheus scrapes."""

    def __init__(self, client: CoreClient):
        self.client = client

    def collect(self):
        stats, name = self.client.stats, [self.client.model_name]

        def family(cls, metric, doc, value):
            f = cls(metric, doc, labels=["model_name"])
            f.add_metric(name, value)
            return f

        yield family(GaugeMetricFamily, "nanokyro_num_requests_running", "Sequences in the running batch.",
                     stats.num_running)  # fmt: skip
        yield family(GaugeMetricFamily, "nanokyro_num_requests_waiting", "Sequences waiting to be scheduled.",
                     stats.num_waiting)  # fmt: skip
        yield family(GaugeMetricFamily, "nanokyro_kv_cache_usage_ratio", "Fraction of KV pages in use (0..1).",
                     stats.kv_pages_used / max(stats.kv_pages_total, 1))  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_num_preemptions", "Sequences preempted for lack of KV pages.",
                     stats.num_preemptions)  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                     "prefix cache.", stats.prefix_cache_queried_tokens)  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                     "cache.", stats.prefix_cache_hit_tokens)  # fmt: skip
        if self.client.max_loras:
            yield family(GaugeMetricFamily, "nanokyro_lora_adapters_resident", "LoRA adapters in a device slot.",
                         stats.loras_resident)  # fmt: skip
            yield family(CounterMetricFamily, "nanokyro_lora_adapter_loads", "LoRA adapters put into a device slot.",
                         stats.lora_loads)  # fmt: skip
            per = CounterMetricFamily("nanokyro_lora_requests", "Requests run under each LoRA adapter.",
                                      labels=["model_name", "lora_name"])  # fmt: skip
            for adapter, n in sorted(stats.lora_requests.items()):
                per.add_metric([*name, adapter], n)
            yield per
        yield family(CounterMetricFamily, "nanokyro_spec_decode_num_drafts", "Speculative decoding: sequence-steps "
                     "that verified drafts.", stats.spec_verify_steps)  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_spec_decode_num_draft_tokens", "Speculative decoding: draft "
                     "tokens proposed and verified.", stats.spec_draft_tokens)  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_spec_decode_num_accepted_tokens", "Speculative decoding: draft "
                     "tokens accepted.", stats.spec_accepted_tokens)  # fmt: skip
        yield family(CounterMetricFamily, "nanokyro_spec_decode_num_forced_tokens", "Speculative decoding: draft "
                     "tokens a structured output's grammar forced (of the draft tokens).", stats.spec_forced_tokens)
        yield family(CounterMetricFamily, "nanokyro_spec_decode_num_forced_accepted_tokens", "Speculative decoding: "
                     "forced draft tokens accepted.", stats.spec_forced_accepted_tokens)  # fmt: skip
        yield family(GaugeMetricFamily, "nanokyro_spec_decode_mean_accepted_length", "Speculative decoding: tokens "
                     "per verify step (accepted drafts + 1), over the engine's life; 0 before any.",
                     (stats.spec_accepted_tokens / stats.spec_verify_steps + 1) if stats.spec_verify_steps else 0.0)
