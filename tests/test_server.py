"""The HTTP API end to end: a real uvicorn server on a free loopback port in a background thread, driven by the
openai SDK (and httpx where the SDK can't send the bad input); /metrics parsed by prometheus_client."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanokyro.config import EngineConfig
from nanokyro.server import MAX_BODY_BYTES, create_app, free_port
from conftest import KEY, ServerThread

CHAT = [{"role": "user", "content": "Hello, how are you?"}]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_app(llama_dir, *, api_key=None, max_queue=1000, core_entry="nanokyro.core_process:run_core", **kw):
    opts = dict(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=16)
    return create_app(EngineConfig(**{**opts, **kw}), api_key=api_key, max_queue=max_queue, core_entry=core_entry)


@pytest.fixture(scope="module")
def served(llama_dir):
    srv = ServerThread(make_app(llama_dir, api_key=KEY))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def engine_idle(srv, timeout=10.0) -> bool:
    """The core's published stats show nothing running or waiting and every page free, and no stream is open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = srv.core.stats
        if not srv.core.num_streams and not stats.num_running and not stats.num_waiting and not stats.kv_pages_used:
            return True
        time.sleep(0.02)
    return False


def metrics(url) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}, parsed by prometheus_client."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


# -- answers ---------------------------------------------------------------------------------------------------


def test_greedy_chat_streamed_and_whole_give_the_same_text(served, client):
    whole = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(served.core.tokenizer.encode_chat(CHAT))
    usage = whole.usage
    assert usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # (A cache hit's count: test_the_server_gives_token_for_token_what_the_offline_llm_gives.)
    assert 0 <= whole.usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens

    chunks = list(client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_completion_streamed_and_whole_give_the_same_text(served, client):
    whole = client.completions.create(model=served.model, prompt="The quick brown", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=served.model, prompt="The quick brown", max_tokens=10,
                                            temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) == whole.usage.completion_tokens  # one chunk per token, even one whose text is not out yet
    assert whole.usage.completion_tokens == 10 or whole.choices[0].finish_reason == "stop"


def test_completion_prompt_shapes_give_one_choice_per_prompt_and_n(served, client):
    tok = served.core.tokenizer
    ids = tok.encode("Paris is the capital")
    text = client.completions.create(model=served.model, prompt="Paris is the capital", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=served.model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    many = client.completions.create(model=served.model, prompt=[ids, tok.encode("Hello, world")], max_tokens=6,
                                     temperature=0, n=2)  # fmt: skip
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text.choices[0].text  # greedy: both the same
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("Hello, world"))
    strings = client.completions.create(model=served.model, prompt=["Paris is the capital", "Hello"], max_tokens=6,
                                        temperature=0)  # fmt: skip
    assert strings.choices[0].text == text.choices[0].text and len(strings.choices) == 2


def test_n_and_seed(served, client):
    ask = dict(model=served.model, messages=CHAT, max_tokens=16, temperature=1.0, n=2, seed=1234, ignore_eos=True)
    a = client.chat.completions.create(**{k: v for k, v in ask.items() if k != "ignore_eos"},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    b = client.chat.completions.create(**{k: v for k, v in ask.items() if k != "ignore_eos"},
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed, same text
    assert a.choices[0].message.content != a.choices[1].message.content  # the two choices draw differently
    assert a.usage.completion_tokens == 32
    streamed = list(client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=16, n=2, seed=1234,
                                                   stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [c.message.content for c in a.choices]


def test_stop_string_ends_the_text_before_it(served, client):
    ask = dict(model=served.model, prompt="Hello, world! How", max_tokens=24, temperature=0,
               extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**ask).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    cut = client.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(**ask, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_logprobs(served, client):
    out = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == out.choices[0].message.content
    plain = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None

    comp = client.completions.create(model=served.model, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for top, logprob in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == comp.choices[0].text


def test_models_health_and_openapi_schema(served, client):
    assert [m.id for m in client.models.list().data] == [served.model]
    assert httpx.get(f"{served.url}/health").status_code == 200
    schema = httpx.get(f"{served.url}/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatCompletion"} <= set(schema["components"]["schemas"])


# -- errors ----------------------------------------------------------------------------------------------------


def raw_post(served, path, content: bytes, key=KEY) -> httpx.Response:
    return httpx.post(f"{served.url}/v1{path}", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip


def bad_requests(served, client):
    m = served.model
    chat = client.chat.completions.create
    yield "malformed json", openai.BadRequestError, lambda: client.post(
        "/chat/completions", cast_to=object, content=b'{"model": "x", "messages": [', options={
            "headers": {"Content-Type": "application/json"}})  # fmt: skip
    yield "not utf-8", openai.BadRequestError, lambda: client.post(
        "/completions", cast_to=object, content=b'{"model": "x", "prompt": "\xff\xfe"}', options={
            "headers": {"Content-Type": "application/json"}})  # fmt: skip
    yield "unknown field", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"tempo": 1})
    yield "wrong type", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"n": "two"})
    yield "max_tokens as a string", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"max_tokens": "10"})
    yield "n as a string", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"n": "1"})
    yield "stream as a number", openai.BadRequestError, lambda: client.completions.create(
        model=m, prompt="hi", extra_body={"stream": 1})
    yield "invalid value", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, temperature=-1)
    yield "temperature above 2", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, temperature=2.5)
    yield "max_tokens 0", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, max_tokens=0)
    yield "top_p 0", openai.BadRequestError, lambda: client.completions.create(model=m, prompt="hi", top_p=0)
    yield "top_p that underflows to 0", openai.BadRequestError, lambda: client.post(
        "/completions", cast_to=object, content=b'{"model": "%s", "prompt": "hi", "top_p": 1e-400}' % m.encode(),
        options={"headers": {"Content-Type": "application/json"}})  # fmt: skip
    yield "repetition_penalty 0", openai.BadRequestError, lambda: client.completions.create(
        model=m, prompt="hi", extra_body={"repetition_penalty": 0})
    yield "bad token id", openai.BadRequestError, lambda: client.completions.create(model=m, prompt=[1, 10**6])
    yield "context overflow", openai.BadRequestError, lambda: client.completions.create(
        model=m, prompt="hello " * 10, max_tokens=2000)
    yield "message without content", openai.BadRequestError, lambda: chat(model=m, messages=[{"role": "user"}])
    yield "unknown model", openai.NotFoundError, lambda: chat(model="gpt-nope", messages=CHAT)
    yield "wrong key", openai.AuthenticationError, lambda: served.client(key="sk-wrong").chat.completions.create(
        model=m, messages=CHAT)
    yield "not a bearer token", openai.AuthenticationError, lambda: client.models.list(
        extra_headers={"Authorization": KEY})


def test_each_bad_request_maps_to_its_sdk_error_and_the_next_request_succeeds(served, client):
    for name, error, call in bad_requests(served, client):
        with pytest.raises(error) as info:
            call()
        body = info.value.body
        assert isinstance(body, dict) and body["message"] and "type" in body and "param" in body, name
        if name == "context overflow":
            assert "1024" in body["message"] and "2000" in body["message"] and body["param"] == "max_tokens"
        if name == "unknown field":
            assert "tempo" in body["message"] and body["param"] == "tempo"
        if name in ("max_tokens as a string", "n as a string", "stream as a number"):
            assert body["param"] == name.split()[0], (name, body)
        if name == "message without content":
            assert body["message"] == "messages[0] has no content"
        if name == "not utf-8":
            assert "UTF-8" in body["message"]
        if name in ("top_p that underflows to 0", "repetition_penalty 0"):
            assert body["param"] == name.split()[0], (name, body)
        ok = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length"), name
    assert engine_idle(served)


def test_wrong_method_is_405_with_allow(served):
    r = httpx.get(f"{served.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_oversized_body_is_413(served, client):
    r = raw_post(served, "/completions", b'{"model": "m", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=served.model, prompt="hi", max_tokens=2).choices[0].text is not None


def test_a_prompt_far_longer_than_the_context_fails_at_once_without_stalling_streams(served, client):
    """A 9 MiB prompt can't fit 1,024 tokens whatever it tokenises to: it is refused before tokenising, and a
    stream running meanwhile gets all its tokens."""
    huge = "word " * ((9 << 20) // 5)
    stream = client.completions.create(model=served.model, prompt="Hi", max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    chunks = []
    done = threading.Thread(target=lambda: chunks.extend(stream))
    done.start()
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="longer than this model's context"):
        client.completions.create(model=served.model, prompt=huge, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="longer than this model's context"):
        client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": huge}])
    assert time.monotonic() - started < 5
    done.join(timeout=60)
    assert len(chunks) == 200
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_an_idle_keep_alive_connection_outlives_uvicorns_five_second_default(served):
    """A client that lags behind (or pauses) reuses its pooled connection: the server must not have closed it."""
    import http.client

    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert conn.getresponse().read()
    sock = conn.sock
    time.sleep(6)  # idle past uvicorn's default keep-alive of 5 s
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # still open, nothing to read (a closed one reads b"")
        sock.recv(1, socket.MSG_PEEK)
    sock.setblocking(True)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert conn.getresponse().status == 200 and conn.sock is sock  # over the same connection
    conn.close()


# -- concurrency and disconnects -------------------------------------------------------------------------------


async def aenumerate(items):
    n = 0
    async for item in items:
        yield n, item
        n += 1


async def stream_all(url: str, count: int, leaves, max_tokens: int, key: str | None = KEY, model: str = ""):
    """count concurrent chat streams through the openai SDK; stream i walks away mid-stream if leaves(i)."""
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count to {i}"}], temperature=0.8, seed=i,
            max_tokens=900 if leaves(i) else max_tokens, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        async with stream:
            async for n, chunk in aenumerate(stream):
                if leaves(i) and n == 3:
                    return None  # walks away mid-stream: leaving the block closes the connection
                if chunk.choices and chunk.choices[0].finish_reason:
                    return chunk.choices[0].finish_reason
        return "no finish"

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


def test_concurrent_streams_with_a_third_disconnecting_leave_nothing_behind(served):
    before = metrics(served.url)
    results = asyncio.run(stream_all(served.url, 32, lambda i: i % 3 == 0, 24, model=served.model))
    assert [r for i, r in enumerate(results) if i % 3 != 0] == ["length"] * 21
    assert engine_idle(served, timeout=2), "requests or pages left behind after the disconnects"
    after = metrics(served.url)
    assert after["nanokyro_num_requests_running{}"] == 0 and after["nanokyro_num_requests_waiting{}"] == 0
    assert after["nanokyro_kv_cache_usage_ratio{}"] == 0
    key = "nanokyro_request_finished_total{finish_reason=abort}"
    assert after.get(key, 0) - before.get(key, 0) == 11


def test_256_streams_with_a_third_disconnecting(llama_dir):
    srv = ServerThread(make_app(llama_dir, max_num_seqs=64))
    try:
        results = asyncio.run(stream_all(srv.url, 256, lambda i: i % 3 == 1, 8, key=None, model=srv.model))
        assert [r for i, r in enumerate(results) if i % 3 != 1] == ["length"] * 171
        assert engine_idle(srv, timeout=5), "requests or pages left behind after the disconnects"
    finally:
        srv.stop()


def test_non_streaming_client_that_leaves_aborts_its_request(llama_dir):
    # slow steps: 900 tokens take 9 s or more, however fast this machine decodes; the client gives up after 0.3 s
    srv = ServerThread(make_app(llama_dir, core_entry="faults:slow_steps"))
    try:
        aborted = "nanokyro_request_finished_total{finish_reason=abort}"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", timeout=0.3,
                       json={"model": srv.model, "prompt": "Hi", "max_tokens": 900, "ignore_eos": True})  # fmt: skip
        assert engine_idle(srv, timeout=2), "the abandoned request kept running"
        assert metrics(srv.url)[aborted] == 1
    finally:
        srv.stop()


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_parse_and_move_after_a_request(served, client):
    before = metrics(served.url)
    client.completions.create(model=served.model, prompt="Hello there", max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    after = metrics(served.url)
    moved = lambda name: after[name] - before.get(name, 0)  # noqa: E731
    assert moved("nanokyro_time_to_first_token_seconds_count{}") == 1
    assert moved("nanokyro_generation_tokens_total{}") == 7
    assert moved("nanokyro_prompt_tokens_total{}") == len(served.core.tokenizer.encode("Hello there"))
    assert moved("nanokyro_time_between_tokens_seconds_count{}") == 6
    assert moved("nanokyro_request_finished_total{finish_reason=length}") == 1
    assert moved("nanokyro_e2e_request_latency_seconds_count{}") == 1
    assert moved("nanokyro_request_queue_time_seconds_count{}") == 1
    assert moved("nanokyro_prefix_cache_queried_tokens_total{}") > 0
    assert 0 <= after["nanokyro_kv_cache_usage_ratio{}"] <= 1
    for name in ("nanokyro_num_requests_running{}", "nanokyro_num_requests_waiting{}",
                 "nanokyro_num_preemptions_total{}", "nanokyro_prefix_cache_hit_tokens_total{}"):  # fmt: skip
        assert name in after
    text = httpx.get(f"{served.url}/metrics").text
    assert all('model_name="' in line for line in text.splitlines() if line and not line.startswith("#"))


# -- dedicated servers -----------------------------------------------------------------------------------------


def test_waiting_queue_limit_holds_under_a_burst(llama_dir):
    """max_queue 8 with the one seat taken: of 30 requests sent at once, exactly 8 wait and 22 get 429 with
    Retry-After (the count is taken before anything awaits); once the seat frees, the 8 run. (Slow steps: the
    900-token request holds the seat for 9 s or more, however fast this machine decodes.)"""
    srv = ServerThread(make_app(llama_dir, max_num_seqs=1, max_queue=8, core_entry="faults:slow_steps"))
    try:
        client = srv.client()
        long = client.completions.create(model=srv.model, prompt="Hi", max_tokens=900, stream=True,
                                         extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(long))  # running: it holds the only seat

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/completions", json={
                    "model": srv.model, "prompt": "Hi", "max_tokens": 2}) for _ in range(30)))  # fmt: skip

        async def burst_then_free():
            task = asyncio.create_task(burst())
            deadline = time.monotonic() + 20
            while srv.app.state.server.num_unstarted < 8:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the rest of the burst is answered meanwhile
            long.close()  # frees the seat
            return await task

        responses = asyncio.run(burst_then_free())
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 8 and statuses.count(429) == 22
        assert all(r.headers["Retry-After"] == "1" for r in responses if r.status_code == 429)
        assert client.completions.create(model=srv.model, prompt="Hi", max_tokens=2).choices

        # A streaming client that gives up while its request still waits for a seat takes it out of the queue.
        long = client.completions.create(model=srv.model, prompt="Hi", max_tokens=900, stream=True,
                                         extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(long))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", timeout=0.5, json={
                "model": srv.model, "prompt": "Hi", "max_tokens": 2, "stream": True})  # fmt: skip
        deadline = time.monotonic() + 5
        while srv.core.stats.num_waiting or srv.app.state.server.num_unstarted:
            assert time.monotonic() < deadline, "the abandoned request is still queued"
            time.sleep(0.02)
        long.close()
    finally:
        srv.stop()


def test_a_request_that_raises_inside_the_core_fails_alone(llama_dir):
    srv = ServerThread(make_app(llama_dir, core_entry="faults:request_raises"))
    try:
        from faults import POISON

        client = srv.client()
        others = client.completions.create(model=srv.model, prompt=[5, 6, 7], max_tokens=60, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        chunks = iter(others)
        next(chunks)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=srv.model, prompt=[POISON, 6, 7], max_tokens=5)
        assert info.value.status_code == 500 and "a bug that only this request hits" in info.value.message
        assert len(list(chunks)) == 59  # the other stream went on to its end
        with pytest.raises(openai.InternalServerError):  # its first token never came: still an HTTP error
            client.completions.create(model=srv.model, prompt=[POISON, 6], max_tokens=5, stream=True)
        assert client.completions.create(model=srv.model, prompt=[5, 6], max_tokens=3).choices
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert engine_idle(srv)
    finally:
        srv.stop()


def test_a_failing_step_fails_its_requests_and_repeated_failures_make_the_engine_unhealthy(llama_dir):
    srv = ServerThread(make_app(llama_dir, core_entry="faults:step_fails_once"), wait_ready=False)
    try:
        r = httpx.get(f"{srv.url}/health")  # the core is still importing torch and loading the model
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        deadline = time.monotonic() + 60
        while srv.core is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = srv.client()
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=srv.model, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 500 and "a bug in this step" in info.value.message
        assert client.completions.create(model=srv.model, prompt="Hi", max_tokens=2).choices
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()

    srv = ServerThread(make_app(llama_dir, core_entry="faults:steps_fail"))
    try:
        client = srv.client()
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                client.completions.create(model=srv.model, prompt="Hi", max_tokens=2)
        deadline = time.monotonic() + 5
        while httpx.get(f"{srv.url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model=srv.model, messages=CHAT, stream=stream)
            assert info.value.status_code == 503 and "unhealthy" in info.value.message
        assert time.monotonic() - started < 2
    finally:
        srv.stop()


def test_a_killed_core_fails_every_stream_at_once_while_the_frontend_still_validates(llama_dir):
    srv = ServerThread(make_app(llama_dir))
    try:
        client = srv.client()
        streams = [client.completions.create(model=srv.model, prompt="Hi", max_tokens=900, stream=True,
                                             extra_body={"ignore_eos": True}) for _ in range(3)]  # fmt: skip
        for s in streams:
            next(iter(s))
        os.kill(srv.core.process.pid, signal.SIGKILL)
        started = time.monotonic()
        for s in streams:
            with pytest.raises(openai.APIError, match="engine core process died"):
                list(s)
        assert time.monotonic() - started < 5
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=srv.model, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503
        # The frontend refuses malformed requests on its own: 400, not 503.
        for bad in (dict(extra_body={"tempo": 1}), dict(extra_body={"max_tokens": "5"}), dict(extra_body={"n": 1.5})):
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=srv.model, prompt="hi", **bad)
    finally:
        srv.stop()


def test_streams_still_running_when_the_shutdown_grace_ends_get_an_error_event_and_done(llama_dir):
    srv = ServerThread(make_app(llama_dir), grace_s=0.5)
    with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=30, json={
            "model": srv.model, "prompt": "Hi", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        events = [line for line in lines if line]
    stopper.join(timeout=30)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_dead" and "shutting down" in error["message"]
    assert srv.core.process.poll() == 0  # the core stopped cleanly


def children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them."""
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(c) for c in f.read().split()]
    return pids


# serve.py's main with the app's core_entry set to a fault of faults.py (tests/ on the path, so the core finds it).
SERVE_WITH_FAULT = ("import functools, sys; sys.path.insert(0, sys.argv.pop(1)); import serve; "
                    "serve.create_app = functools.partial(serve.create_app, core_entry=sys.argv.pop(1)); serve.main()")


@contextlib.contextmanager
def serve_py_streaming(llama_dir, max_tokens: int, *options: str, core_entry: str | None = None):
    """`python serve.py [options]` on a free port, ready (its one line says where it serves), with one stream that
    has begun: yields the process, its engine core's pid and the stream. The process is killed at the end.
    core_entry: run serve.py's main with that engine core (a fault of faults.py)."""
    port = free_port()
    program = ["serve.py"] if core_entry is None else ["-c", SERVE_WITH_FAULT, os.path.join(ROOT, "tests"), core_entry]
    proc = subprocess.Popen([sys.executable, *program, "--model", llama_dir, "--port", str(port), "--dtype",
                             "float32", "--kv-cache-memory", "16M", "--served-model-name", "tiny", *options],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(90, proc.kill)  # never hang the suite on a server that does not start
    watchdog.start()
    try:
        for line in proc.stderr:
            if "serving" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in line
        (core,) = children(proc.pid)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=max_tokens, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(stream))
        yield proc, core, stream
    finally:
        watchdog.cancel()
        proc.kill()


def test_serve_py_finishes_streams_on_sigterm_and_leaves_no_process(llama_dir):
    with serve_py_streaming(llama_dir, max_tokens=40) as (proc, core, stream):
        proc.send_signal(signal.SIGTERM)
        chunks = list(stream)  # the in-flight request is allowed to finish
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"/proc/{core}"), "the engine core outlived the server"


def test_sigterm_with_requests_outlasting_the_grace_ends_each_with_an_openai_error(llama_dir):
    # slow steps: the requests must outlast the grace however fast this machine decodes the tiny model
    with serve_py_streaming(llama_dir, 900, "--shutdown-grace", "0.5",
                            core_entry="faults:slow_steps") as (proc, _, stream):  # fmt: skip
        url = str(stream.response.url.copy_with(path="/v1/chat/completions"))
        answer = {}

        def whole():  # a non-streaming request, in flight when the signal comes
            answer["r"] = httpx.post(url, timeout=60, json={"model": "tiny", "messages": CHAT, "max_tokens": 900,
                                                            "ignore_eos": True})  # fmt: skip

        asker = threading.Thread(target=whole)
        asker.start()
        time.sleep(1.0)  # the request is running
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
        asker.join(timeout=60)
        r = answer["r"]
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
        assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["type"] == "service_unavailable"
        assert proc.wait(timeout=30) == 0


def test_serve_py_exits_non_zero_when_its_core_dies(llama_dir):
    with serve_py_streaming(llama_dir, max_tokens=900) as (proc, core, stream):
        os.kill(core, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="engine core process died"):
            list(stream)
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - started < 5


def test_serve_py_exits_non_zero_when_its_core_turns_unhealthy(llama_dir):
    """A core whose device fails lives on but steps no more: the stream in flight ends with an error, and serve.py
    shuts down (stopping the core) and exits 1 instead of answering 503 for ever."""
    with serve_py_streaming(llama_dir, 900, core_entry="faults:device_lost_after_a_few_steps") as (proc, core, stream):
        with pytest.raises(openai.APIError, match="unhealthy.*CUDA error"):
            list(stream)
        started = time.monotonic()
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - started < 5
        assert not os.path.exists(f"/proc/{core}"), "the engine core outlived the server"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def test_structured_outputs_through_the_api(served, client):
    import json
    import re

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model=served.model, messages=CHAT, response_format=fmt, max_tokens=80, seed=1)
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = client.completions.create(model=served.model, prompt="Hi", max_tokens=20, stream=True,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", "".join(c.choices[0].text for c in out))
    out = client.completions.create(model=served.model, prompt="Hi", max_tokens=20,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})  # fmt: skip
    assert out.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("body,problem", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "invalid json schema"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "invalid regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}}, "invalid grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one of"),
])  # fmt: skip
def test_invalid_constraints_are_400_and_the_server_keeps_serving(served, client, body, problem):
    with pytest.raises(openai.BadRequestError, match=problem):
        client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=5, **body)
    assert client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=2).choices[0].message
    assert engine_idle(served)


@pytest.mark.parametrize("sampling", [
    dict(top_p=1e-300), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
    dict(temperature=0, repetition_penalty=1e300), dict(temperature=0, repetition_penalty=1e-300),
    dict(temperature=2, top_p=1e-300, repetition_penalty=1e300), dict(temperature=2, min_p=1, top_k=1,
                                                                         repetition_penalty=1e-300),
], ids=str)  # fmt: skip
def test_extreme_valid_sampling_parameters_still_give_output_the_constraint_allows(served, client, sampling):
    """Parameters at the edge of their ranges (1e-300 is 0 in fp32, 1e300 inf), where the penalised and filtered
    distribution once left only tokens the grammar forbids: the request failed inside the core. Each is served, and
    the output satisfies its JSON schema or regex."""
    import re

    import jsonschema

    body = {"ignore_eos": True, **{k: v for k, v in sampling.items() if k in ("top_k", "min_p", "repetition_penalty")}}
    openai_fields = {k: v for k, v in sampling.items() if k in ("temperature", "top_p")}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model=served.model, messages=CHAT, response_format=fmt, max_tokens=100,
                                         seed=3, extra_body=body, **openai_fields)  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    stream = client.completions.create(model=served.model, prompt="Hi", max_tokens=20, stream=True, seed=3,
                                       extra_body={**body, "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
                                       **openai_fields)  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", "".join(c.choices[0].text for c in stream))
    assert engine_idle(served)


def test_the_server_gives_token_for_token_what_the_offline_llm_gives(served, client, llama_dir):
    """Greedy requests through the multi-process server, streamed and whole, against `LLM` in this process: the
    same tokens (their pieces, via logprobs), text and finish reasons, with n=2, a stop string, logprobs, a JSON
    schema, and a prefix served from the cache."""
    from nanokyro import LLM, SamplingParams, StructuredOutput

    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=16)
    tok = llm.tokenizer
    prompt = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop.strip()
    cases = [
        (dict(max_tokens=24, ignore_eos=True), {}),
        (dict(max_tokens=16, n=2), {}),
        (dict(max_tokens=24, ignore_eos=True, stop=[stop]), {}),
        (dict(max_tokens=40, structured=StructuredOutput(json=PERSON)), {"structured_outputs": {"json": PERSON}}),
    ]
    for fields, body in cases:
        params = SamplingParams(temperature=0, logprobs=2, **fields)
        want = llm.generate(prompt, params)[0]
        api = dict(model=served.model, prompt=prompt, temperature=0, max_tokens=fields["max_tokens"],
                   n=fields.get("n", 1), stop=fields.get("stop"),
                   extra_body={"ignore_eos": fields.get("ignore_eos", False), **body})  # fmt: skip
        whole = client.completions.create(**api, logprobs=2)
        streamed = list(client.completions.create(**api, stream=True))
        for choice, out in zip(whole.choices, want.outputs):
            assert choice.text == out.text and choice.finish_reason == out.finish_reason, fields
            pieces = [tok.decode([t], skip_special_tokens=False) for t in out.token_ids]
            assert choice.logprobs.tokens == pieces[: len(choice.logprobs.tokens)], fields
            # fp32 rounding apart: the core runs fewer CPU threads than this process, and oneDNN splits its sums by them
            assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in out.logprobs][:len(pieces)],
                                                                   rel=1e-5, abs=1e-6)  # fmt: skip
            text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == choice.index)
            assert text == out.text, fields
        assert whole.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs), fields

    shared = tok.decode(list(range(40, 140)))  # a long prefix: its full pages are cached after the first request
    first = client.completions.create(model=served.model, prompt=shared + " one", max_tokens=8, temperature=0)
    again = client.completions.create(model=served.model, prompt=shared + " two", max_tokens=8, temperature=0)
    assert first.choices and again.usage.prompt_tokens_details.cached_tokens >= 64
    offline = llm.generate(shared + " two", SamplingParams(max_tokens=8, temperature=0))[0]
    assert again.choices[0].text == offline.text
    assert engine_idle(served)


def core_processes() -> list[int]:
    """This process's engine cores (children started for a CoreClient)."""
    pids = []
    for pid in children(os.getpid()):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"nanokyro.core_process:run_core" in f.read():
                    pids.append(pid)
    return pids


def test_stopping_a_server_while_its_model_loads_leaves_no_core_behind(llama_dir):
    before = set(core_processes())
    srv = ServerThread(make_app(llama_dir), wait_ready=False)
    deadline = time.monotonic() + 5
    while not (started := set(core_processes()) - before):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [core] = started  # importing torch, loading: it reads no message yet
    srv.stop()
    assert not srv.thread.is_alive()
    assert not os.path.exists(f"/proc/{core}"), "the loading core outlived its server"


def test_fields_clients_always_send_are_accepted_and_usage_can_come_with_every_chunk(served, client):
    """guidellm sends stream_options.continuous_usage_stats; the openai SDK sends user, metadata, store."""
    chat = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=4, user="u-1",
                                          metadata={"k": "v"}, store=False, service_tier="auto",
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.usage.completion_tokens == 4
    out = client.completions.create(model=served.model, prompt="Hi", max_tokens=4, temperature=0, user="u-1",
                                    extra_body={"ignore_eos": True})  # fmt: skip
    chunks = list(client.completions.create(model=served.model, prompt="Hi", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    assert [c.usage.completion_tokens for c in chunks] == [1, 2, 3, 4, 4]  # then the final usage-only chunk
    assert chunks[-1].choices == [] and all(c.usage.prompt_tokens == out.usage.prompt_tokens for c in chunks)


def test_one_model_by_id_and_a_metrics_content_type_with_one_charset(served, client):
    import email.message

    assert client.models.retrieve(served.model).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")
    r = httpx.get(f"{served.url}/metrics")
    header = email.message.Message()
    header["content-type"] = r.headers["content-type"]
    assert header.get_content_type() == "text/plain" and header.get_params()[1:] == [("version", "0.0.4"),
                                                                                     ("charset", "utf-8")]
