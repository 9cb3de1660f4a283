"""The HTTP API end to end: a real uvicorn server on a free loopback port in a background thread, driven by the
openai SDK (and httpx where the SDK can't send the bad input); /metrics parsed by prometheus_client."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanokyro.config import EngineConfig
from nanokyro.engine import AsyncEngine
from nanokyro.server import MAX_BODY_BYTES, create_app, free_port
from conftest import KEY, ServerThread

CHAT = [{"role": "user", "content": "Hello, how are you?"}]


def make_engine(llama_dir, **kw) -> AsyncEngine:
    opts = dict(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20, max_num_seqs=16)
    return AsyncEngine(EngineConfig(**{**opts, **kw}))


@pytest.fixture(scope="module")
def served(llama_dir):
    engine = make_engine(llama_dir)
    srv = ServerThread(create_app(engine, api_key=KEY))
    srv.engine = engine
    srv.model = engine.model_name
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def engine_idle(engine: AsyncEngine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    core = engine.engine
    while time.monotonic() < deadline:
        if not core.scheduler.has_work() and not core.requests and core.blocks.all_free() and not engine._streams:
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
    assert whole.usage.prompt_tokens == len(served.engine.tokenizer.encode_chat(CHAT))
    usage = whole.usage
    assert usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0

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
    tok = served.engine.tokenizer
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
    yield "unknown field", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"tempo": 1})
    yield "wrong type", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, extra_body={"n": "two"})
    yield "invalid value", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, temperature=-1)
    yield "max_tokens 0", openai.BadRequestError, lambda: chat(model=m, messages=CHAT, max_tokens=0)
    yield "top_p 0", openai.BadRequestError, lambda: client.completions.create(model=m, prompt="hi", top_p=0)
    yield "bad token id", openai.BadRequestError, lambda: client.completions.create(model=m, prompt=[1, 10**6])
    yield "context overflow", openai.BadRequestError, lambda: client.completions.create(
        model=m, prompt="hello " * 10, max_tokens=2000)
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
            assert "1024" in body["message"] and "2000" in body["message"]
        if name == "unknown field":
            assert "tempo" in body["message"] and body["param"] == "tempo"
        ok = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length"), name


def test_oversized_body_is_413(served, client):
    r = raw_post(served, "/completions", b'{"model": "m", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=served.model, prompt="hi", max_tokens=2).choices[0].text is not None


# -- concurrency and disconnects -------------------------------------------------------------------------------


async def aenumerate(items):
    n = 0
    async for item in items:
        yield n, item
        n += 1


def test_concurrent_streams_with_a_third_disconnecting_leave_nothing_behind(served):
    async def one(client, i):
        leaves = i % 3 == 0  # asks for far more than it will read: only an abort ends it soon
        stream = await client.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": f"Count to {i}"}], temperature=0.8, seed=i,
            max_tokens=1000 if leaves else 24, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        async with stream:
            async for n, chunk in aenumerate(stream):
                if leaves and n == 3:
                    return None  # walks away mid-stream: leaving the block closes the connection
                if chunk.choices and chunk.choices[0].finish_reason:
                    return chunk.choices[0].finish_reason
        return "no finish"

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = metrics(served.url)
    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i % 3 != 0] == ["length"] * 21
    assert engine_idle(served.engine, timeout=1), "requests or pages left behind after the disconnects"
    assert served.engine.num_requests_running == 0 and served.engine.num_requests_waiting == 0
    after = metrics(served.url)
    key = "nanokyro_request_finished_total{finish_reason=abort}"
    assert after.get(key, 0) - before.get(key, 0) == 11


def test_non_streaming_client_that_leaves_aborts_its_request(served):
    aborted = "nanokyro_request_finished_total{finish_reason=abort}"
    before = metrics(served.url).get(aborted, 0)
    with pytest.raises(httpx.ReadTimeout):  # 900 tokens take over a second; the client gives up after 0.3 s
        httpx.post(f"{served.url}/v1/completions", timeout=0.3, headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": served.model, "prompt": "Hi", "max_tokens": 900, "ignore_eos": True})  # fmt: skip
    assert engine_idle(served.engine, timeout=2), "the abandoned request kept running"
    assert metrics(served.url)[aborted] - before == 1


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_parse_and_move_after_a_request(served, client):
    before = metrics(served.url)
    client.completions.create(model=served.model, prompt="Hello there", max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    after = metrics(served.url)
    moved = lambda name: after[name] - before.get(name, 0)  # noqa: E731
    assert moved("nanokyro_time_to_first_token_seconds_count{}") == 1
    assert moved("nanokyro_generation_tokens_total{}") == 7
    assert moved("nanokyro_prompt_tokens_total{}") == len(served.engine.tokenizer.encode("Hello there"))
    assert moved("nanokyro_time_between_tokens_seconds_count{}") == 6
    assert moved("nanokyro_request_finished_total{finish_reason=length}") == 1
    assert moved("nanokyro_e2e_request_latency_seconds_count{}") == 1
    assert moved("nanokyro_request_queue_time_seconds_count{}") == 1
    assert 0 <= after["nanokyro_kv_cache_usage_ratio{}"] <= 1
    for name in ("nanokyro_num_requests_running{}", "nanokyro_num_requests_waiting{}",
                 "nanokyro_num_preemptions_total{}", "nanokyro_prefix_cache_queried_tokens_total{}",
                 "nanokyro_prefix_cache_hit_tokens_total{}"):  # fmt: skip
        assert name in after
    text = httpx.get(f"{served.url}/metrics").text
    assert all('model_name="' in line for line in text.splitlines() if line and not line.startswith("#"))


# -- dedicated servers -----------------------------------------------------------------------------------------


def test_waiting_queue_over_the_limit_is_429_with_retry_after(llama_dir):
    engine = make_engine(llama_dir, max_num_seqs=1)
    srv = ServerThread(create_app(engine, max_queue=0))
    try:
        client = srv.client()
        long = client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=900, stream=True,
                                         extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(long))  # running: it holds the only seat
        waiter = threading.Thread(target=lambda: client.completions.create(model=engine.model_name, prompt="Hi",
                                                                           max_tokens=2))  # fmt: skip
        waiter.start()
        deadline = time.monotonic() + 10
        while metrics(srv.url).get("nanokyro_num_requests_waiting{}", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2)
        assert info.value.response.headers["Retry-After"] == "1"
        long.close()  # frees the seat: the waiting request runs, and a new one is welcome again
        waiter.join(timeout=20)
        assert client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2).choices
    finally:
        srv.stop()


class Boom(BaseException):
    pass


def test_a_failing_step_fails_its_requests_but_a_dead_loop_makes_everything_503(llama_dir):
    engine = make_engine(llama_dir)
    srv = ServerThread(create_app(engine))
    try:
        client = srv.client()
        step = engine.engine.step

        def fails_once():
            engine.engine.step = step
            raise RuntimeError("a bug in this step")

        engine.engine.step = fails_once
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 500 and "a bug in this step" in info.value.message
        assert client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2).choices
        assert httpx.get(f"{srv.url}/health").status_code == 200

        def boom():
            raise Boom("the step loop blew up")

        engine.engine.step = boom
        with pytest.raises(openai.InternalServerError) as info:  # the request in flight when the loop died
            client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503
        assert httpx.get(f"{srv.url}/health").status_code == 503
        started = time.monotonic()
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model=engine.model_name, messages=CHAT, stream=stream)
            assert info.value.status_code == 503 and "Boom" in info.value.message
        assert time.monotonic() - started < 2
    finally:
        srv.stop()


def test_health_is_503_while_the_model_loads(llama_dir):
    release = threading.Event()

    def load():
        release.wait(20)
        return make_engine(llama_dir)

    app = create_app(load)
    srv = ServerThread(app)
    try:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        srv.stop()


def test_serve_py_announces_its_url_and_exits_cleanly_on_sigterm(llama_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", llama_dir, "--port", str(port), "--dtype",
                             "float32", "--kv-cache-memory", "16M", "--served-model-name", "tiny"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a server that does not start
    watchdog.start()
    try:
        for line in proc.stderr:
            if "serving" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=40, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        chunks = list(stream)  # the in-flight request is allowed to finish
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        proc.kill()


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
    assert engine_idle(served.engine)
