"""Function calling: tool calls read from model text (whole and streamed), tools and tool history rendered by the
chat template (transformers' own rendering is the reference), and tools through the HTTP API with the openai SDK,
where a constrained tool_choice must always give calls whose arguments validate against the tool's schema."""
from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest

from nanokyro.config import EngineConfig
from nanokyro.server import create_app
from nanokyro.tokenizer import Tokenizer
from nanokyro.tool_calls import FORMATS, ToolCallParser, merge, parse
from conftest import KEY, VOCAB, ServerThread

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}  # fmt: skip
TIME = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": -12, "maximum": 14},
                                         "exact": {"type": "boolean"}},
        "required": ["hours", "exact"]}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    {"role": "system", "content": "You are helpful."},
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
]  # fmt: skip


# -- reading calls ---------------------------------------------------------------------------------------------

HERMES_TEXT = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"hours": 1, "exact": true}}\n</tool_call>')


def streamed(text: str, fmt, piece: int) -> tuple[str, list[dict]]:
    """The text fed `piece` characters at a time: all content, and the deltas put together into calls."""
    parser, content, deltas = ToolCallParser(fmt), "", []
    for i in range(0, len(text), piece):
        c, k = parser.feed(text[i:i + piece])
        content, deltas = content + c, deltas + k
    c, k = parser.finish()
    return content + c, merge(deltas + k)


def plain(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_hermes_calls_read_the_same_whole_and_streamed_in_any_pieces(piece):
    content, calls = parse(HERMES_TEXT, FORMATS["hermes"])
    assert content == "Let me look."
    assert plain(calls) == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"hours": 1, "exact": True})]
    assert [c["index"] for c in calls] == [0, 1] and len({c["id"] for c in calls}) == 2
    s_content, s_calls = streamed(HERMES_TEXT, FORMATS["hermes"], piece)
    assert s_content.strip() == content and plain(s_calls) == plain(calls)


def test_hermes_arguments_stream_in_pieces_that_add_up_to_the_call():
    parser, deltas = ToolCallParser(FORMATS["hermes"]), []
    for ch in HERMES_TEXT:
        deltas += parser.feed(ch)[1]
    deltas += parser.finish()[1]
    first = [d for d in deltas if d["index"] == 0]
    assert first[0]["function"] == {"name": "get_weather", "arguments": ""} and first[0]["id"].startswith("call_")
    assert len(first) > 10 and all(set(d) == {"index", "function"} for d in first[1:])  # pieces: arguments only
    assert "".join(d["function"]["arguments"] for d in first) == '{"city": "Paris", "unit": "celsius"}'


def test_text_that_is_not_a_call_stays_content():
    fmt = FORMATS["hermes"]
    assert parse("a < b and <tool_call>not json</tool_call>", fmt) == ("a < b and <tool_call>not json</tool_call>", [])
    assert parse("no calls at all <tool_", fmt) == ("no calls at all <tool_", [])
    # A call whose closing tag never came (the model stopped first) still counts if its JSON is whole.
    content, calls = parse('<tool_call>\n{"name": "get_time", "arguments": {"hours": 2, "exact": false}}', fmt)
    assert content is None and plain(calls) == [("get_time", {"hours": 2, "exact": False})]
    # Nor if the name does not come first: then the call is read whole at its end.
    content, calls = parse('<tool_call>\n{"arguments": {"hours": 3, "exact": true}, "name": "get_time"}\n</tool_call>', fmt)
    assert content is None and plain(calls) == [("get_time", {"hours": 3, "exact": True})]


@pytest.mark.parametrize("piece", [1, 1000])
def test_llama3_json_calls(piece):
    fmt = FORMATS["llama3_json"]
    text = '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; {"name": "get_time", "parameters": {"hours": 0, "exact": true}}'
    assert plain(streamed(text, fmt, piece)[1]) == [("get_weather", {"city": "Oslo", "unit": "celsius"}),
                                                    ("get_time", {"hours": 0, "exact": True})]  # fmt: skip
    assert streamed("It is {warm} today", fmt, piece) == ("It is {warm} today", [])
    assert streamed('{"not": "a call"}', fmt, piece) == ('{"not": "a call"}', [])


# -- rendering -------------------------------------------------------------------------------------------------

# A template of the kind Qwen2.5's and Llama 3.1's are: it reads `tools` and renders calls and tool results itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(llama_dir: str, template: str, tmp_path) -> str:
    import shutil

    path = str(tmp_path / "tools_model")
    shutil.copytree(llama_dir, path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "chat_template": template}, f)
    return path


def test_a_tools_template_renders_tools_and_history_as_transformers_does(llama_dir, tmp_path):
    import transformers

    path = with_template(llama_dir, TOOLS_TEMPLATE, tmp_path)
    ours = Tokenizer.from_dir(path)
    assert ours.template_takes_tools
    hf = transformers.AutoTokenizer.from_pretrained(path)
    # transformers hands the template what it is given: the arguments as an object, as HF templates expect.
    hf_history = json.loads(json.dumps(HISTORY))
    hf_history[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "celsius"}
    hf_history[2].pop("content")
    expected = hf.apply_chat_template(hf_history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(HISTORY, tools=TOOLS) == expected
    assert '"name": "get_weather"' in expected and "18 degrees" in expected


def test_a_template_without_tools_gets_them_as_a_system_message_and_history_as_hermes_text(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    assert not tok.template_takes_tools and tok.tool_format == "hermes"
    text = tok.apply_chat_template(HISTORY, tools=TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are helpful.")
    for tool in TOOLS:
        assert json.dumps(tool) in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call><|im_end|>') in text  # fmt: skip
    assert "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response><|im_end|>" in text


# -- over HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(llama_dir):
    srv = ServerThread(create_app(EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20,
                                               max_num_seqs=16), api_key=KEY))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def assert_valid_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(chunks) -> tuple[str, list, str]:
    """A streamed answer put together the way clients do: content concatenated, each call's fields by index."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_always_gives_calls_whose_arguments_validate(served, client, seed):
    out = client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=200, seed=seed)  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)

    chunks = list(client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS,
                                                 tool_choice="required", max_tokens=200, seed=seed, stream=True))
    content, calls, finish = collect_stream(chunks)
    assert finish == "tool_calls" and content == ""
    pieces = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if d.index == 0]
    assert pieces[0].id and pieces[0].function.name and len(pieces) > 2  # the arguments came in pieces
    # Same seed, same tokens: the stream carries the same calls.
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_a_named_function_is_called_exactly_once(served, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in (4, 5):
        out = client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                             max_tokens=200, seed=seed)  # fmt: skip
        calls = out.choices[0].message.tool_calls
        assert len(calls) == 1 and out.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(calls, names=("get_time",))
    _, calls, finish = collect_stream(client.chat.completions.create(
        model=served.model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, seed=6, stream=True))
    assert len(calls) == 1 and calls[0]["name"] == "get_time" and finish == "tool_calls"
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME)


def test_parallel_tool_calls_false_allows_one_call_and_n_choices_each_get_theirs(served, client):
    out = client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, n=3, seed=7)  # fmt: skip
    assert len(out.choices) == 3
    for choice in out.choices:
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls)


def test_auto_and_none_answer_with_text_or_calls(served, client):
    # A random model does not open calls on its own: auto gives text (or, rarely, a valid call), none always text.
    for choice in ("auto", "none"):
        out = client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                             max_tokens=20, seed=8)  # fmt: skip
        message = out.choices[0].message
        assert message.content or (choice == "auto" and message.tool_calls)
        if choice == "none":
            assert message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
        content, calls, finish = collect_stream(client.chat.completions.create(
            model=served.model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=20, seed=8, stream=True))
        assert content == (message.content or "") and finish == out.choices[0].finish_reason


def test_a_history_with_calls_and_tool_results_renders_and_is_answered(served, client):
    out = client.chat.completions.create(model=served.model, messages=HISTORY, tools=TOOLS, max_tokens=5, seed=9)
    assert out.choices[0].message.content or out.choices[0].message.tool_calls
    expected = served.core.tokenizer.encode_chat(HISTORY, tools=TOOLS)
    assert out.usage.prompt_tokens == len(expected)
    # Without tools, the history still renders (tool_choice defaults to none).
    out = client.chat.completions.create(model=served.model, messages=HISTORY, max_tokens=5)
    assert out.usage.prompt_tokens == len(served.core.tokenizer.encode_chat(HISTORY))


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    # The engine compiles the tools' schemas: its error names the problem, not a field.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]},
     "invalid structural tag"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
])  # fmt: skip
def test_inconsistent_tool_requests_are_400_naming_the_field_or_problem(served, client, body, param):
    r = httpx.post(f"{served.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": served.model, "messages": ASK, "max_tokens": 2, **body})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(param) if " " in param else error["param"].startswith(param)  # tools[0].type
    assert client.chat.completions.create(model=served.model, messages=ASK, max_tokens=2).choices[0].message


# -- opt-in: a real model --------------------------------------------------------------------------------------

# A Qwen2.5 GGUF file; by default the target of the pair the speculative-decoding test reads (NANOKYRO_SPEC_PAIR).
PAIR_DIR = os.environ.get("NANOKYRO_SPEC_PAIR")
REAL_GGUF = os.environ.get("NANOKYRO_TOOLS_GGUF") or (os.path.join(PAIR_DIR, "target.gguf") if PAIR_DIR else "")


@pytest.mark.skipif(not os.path.isfile(REAL_GGUF), reason="set NANOKYRO_TOOLS_GGUF to a Qwen2.5 GGUF file")
def test_a_real_model_asked_for_the_weather_calls_the_weather_tool():
    # tool_choice required: the call's form is guaranteed, what is called and with what is the model's choice.
    # (With auto, Qwen2.5-Coder-1.5B answers this with the call as a ```json block instead of a <tool_call>.)
    srv = ServerThread(create_app(EngineConfig(model=REAL_GGUF, kv_cache_memory=256 << 20, max_model_len=2048),
                                  api_key=KEY), start_timeout_s=600)  # fmt: skip
    try:
        client = srv.client().with_options(timeout=600)
        ask = [{"role": "user", "content": "What's the weather like in Paris right now? Use celsius."}]
        out = client.chat.completions.create(model=srv.model, messages=ask, tools=TOOLS, tool_choice="required",
                                             max_tokens=60, temperature=0)  # fmt: skip
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls", out.choices[0].message
        assert [c.function.name for c in calls] == ["get_weather"]
        args = json.loads(calls[0].function.arguments)
        jsonschema.validate(args, WEATHER)
        assert args["city"].lower() == "paris"
        _, streamed_calls, finish = collect_stream(client.chat.completions.create(
            model=srv.model, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0,
            stream=True))  # fmt: skip
        assert finish == "tool_calls" and [(c["name"], json.loads(c["arguments"])) for c in streamed_calls] == [
            ("get_weather", args)]
    finally:
        srv.stop()


def test_auto_allows_text_and_holds_an_opened_call_to_its_tools_schema(llama_dir):
    """tool_choice auto's grammar, compiled by xgrammar as the engine compiles it (a random model never opens a
    call, so the server tests cannot show this): any text is allowed; a call, once opened, must name a tool,
    follow its schema and close; what it allows reads back as the call."""
    import xgrammar as xgr

    from nanokyro.grammar import GrammarCompiler
    from nanokyro.request import StructuredOutput
    from nanokyro.tool_calls import ToolUse

    use = ToolUse.from_request(TOOLS, "auto", None, "hermes")
    compiled = GrammarCompiler(Tokenizer.from_dir(llama_dir), VOCAB, [2]).compile(
        StructuredOutput(structural_tag=use.grammar()))

    def allows(text: str) -> bool:
        return xgr.GrammarMatcher(compiled).accept_string(text)

    call = FORMATS["hermes"].call_text("get_weather", {"city": "Paris", "unit": "celsius"})
    assert allows("It is sunny in Paris, I think.")
    assert allows("Let me look. " + call)
    assert not allows('Let me look. <tool_call>\n{"name": "get_news"')  # not a tool
    assert not allows('<tool_call>\n{"name": "get_weather", "arguments": {"city": 5')  # against the schema
    assert not allows('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')  # unit is required
    assert plain(parse("Let me look. " + call, FORMATS["hermes"])[1]) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
