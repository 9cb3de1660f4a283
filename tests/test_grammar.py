"""Constrained decoding through xgrammar, end to end on the CPU: JSON schemas (validated by `jsonschema`), regexes,
choices and EBNF grammars on the default model and a tiny random one; that unconstrained neighbours are untouched;
that preemption, n > 1, stop strings and max_tokens compose with a grammar; that bad specs fail clearly."""
from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest
import torch

from conftest import assert_no_leak
from nanokyro import LLM, SamplingParams, StructuredOutput
from nanokyro.grammar import GrammarCompiler, TokenBitmask
from nanokyro.sampler import SampleRow, Sampler

# Strings are bounded by a pattern, not maxLength: xgrammar 0.2.8 spells a maxLength string as [^"\\\r\n]{0,n},
# which lets a random model write raw control characters that JSON forbids (real models don't pick them).
NAME = {"type": "string", "pattern": "^[A-Za-z ]{1,10}$"}
PERSON = {
    "type": "object",
    "properties": {
        "name": NAME,
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": NAME, "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
# Short enough for the default model to write 50 of them quickly on a CPU.
SMALL = {
    "type": "object",
    "properties": {
        "role": {"enum": ["admin", "user"]},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
        "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x"]},
    },
    "required": ["role", "level", "tags", "pos"],
}
ARITHMETIC = r"""
root ::= expr
expr ::= term (op term){0,3}
term ::= num | "(" num op num ")"
op ::= " + " | " - " | " * "
num ::= [1-9] [0-9]{0,2}
"""


@pytest.fixture(scope="module")
def tiny(llama_dir):
    return LLM(llama_dir, dtype="float32", max_num_batched_tokens=512, max_num_seqs=64, kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def default_llm():
    return LLM(None, dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=64)


def constrained(spec: dict, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 200, "temperature": 1.0, "n": n, "structured": StructuredOutput(**spec), **kw})


def sampled_params(count: int, spec: dict, **kw) -> list[SamplingParams]:
    return [constrained(spec, seed=i, **kw) for i in range(count)]


def assert_fifty_outputs_validate(llm, schema):
    outs = llm.generate(["A person as JSON:"] * 50, sampled_params(50, {"json": schema}, max_tokens=160))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        assert out.token_ids[-1] in llm.engine.eos_ids  # the grammar ended on a stop token, not in the text
    assert len({o.text for o in outs}) > 10  # sampling still varies within the grammar
    assert_no_leak(llm)


def test_fifty_json_schema_outputs_validate_on_each_tiny_model(tiny_model_dir):
    assert_fifty_outputs_validate(LLM(tiny_model_dir, dtype="float32", max_num_seqs=64, kv_cache_memory=16 << 20), PERSON)


def test_fifty_json_schema_outputs_validate_on_the_default_model(default_llm):
    assert_fifty_outputs_validate(default_llm, SMALL)


def test_json_mode_gives_any_json_object(tiny):
    outs = tiny.generate(["{"] * 8, sampled_params(8, {"json": True}, max_tokens=400))
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished  # a random model can nest forever; those that finish parse
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    assert_no_leak(tiny)


@pytest.mark.parametrize("regex", [r"\d{3}-\d{4}", r"(yes|no|maybe)!", r"[a-z]{1,12}@[a-z]{2,8}\.(com|org)", r"0x[0-9a-f]{1,6}"])
def test_regex_outputs_match_the_whole_regex(tiny, regex):
    outs = tiny.generate("Answer:", constrained({"regex": regex}, n=6, seed=1, max_tokens=64))
    for c in outs[0].outputs:
        assert c.finish_reason == "stop", c.text
        assert re.fullmatch(regex, c.text), c.text
    assert_no_leak(tiny)


def test_choice_returns_one_of_the_choices(tiny):
    choices = ["yes", "no", 'a "quoted" word', "new\nline", "café 😀"]
    outs = tiny.generate(["Pick one:"] * 30, sampled_params(30, {"choice": choices}, max_tokens=32))
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) >= 3
    # Greedy, and with ignore_eos: the grammar still ends the output.
    out = tiny.generate("Pick one:", constrained({"choice": ["alpha", "beta"]}, temperature=0, ignore_eos=True))[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    assert_no_leak(tiny)


def test_ebnf_grammar_outputs_parse(tiny, default_llm):
    for llm, count in ((tiny, 20), (default_llm, 4)):
        outs = llm.generate(["Compute:"] * count, sampled_params(count, {"grammar": ARITHMETIC}, max_tokens=64))
        for out in outs:
            assert out.finish_reason == "stop", out.text
            tree = ast.parse(out.text, mode="eval")  # the grammar's sentences are Python expressions
            assert {type(n) for n in ast.walk(tree)} <= {ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult}
        assert_no_leak(llm)


def test_unconstrained_requests_are_unchanged_beside_constrained_ones(tiny):
    prompts = ["The quick brown fox", "Hello, world!", "def add(a, b):"]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [o.token_ids for o in tiny.generate(prompts, greedy)]
    json_alone = tiny.generate("A person:", constrained({"json": PERSON}, temperature=0))[0].token_ids
    mixed = tiny.generate(
        ["A person:", prompts[0], "Phone:", prompts[1], "Pick:", prompts[2]],
        [constrained({"json": PERSON}, temperature=0), greedy, constrained({"regex": r"\d{3}-\d{4}"}), greedy,
         constrained({"choice": ["x", "y"]}, seed=0), greedy],
    )  # fmt: skip
    assert [mixed[i].token_ids for i in (1, 3, 5)] == alone
    assert mixed[0].token_ids == json_alone  # and the constrained one is batch-invariant too
    assert_no_leak(tiny)


def test_preemption_and_prefix_cache_do_not_advance_a_matcher_twice(llama_dir, tiny):
    """Recomputing a preempted sequence re-runs its tokens without sampling them: the matcher sees each token once,
    so greedy outputs equal those of a roomy engine and still validate."""
    prompts = [f"Person number {i} as JSON:" for i in range(8)]
    params = constrained({"json": PERSON}, temperature=0)
    roomy = [o.text for o in tiny.generate(prompts, params)]
    small = LLM(llama_dir, dtype="float32", kv_cache_memory=24 * 8192, page_size=16, max_num_seqs=8)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.text for o in outs] == roomy
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)
    again = small.generate(prompts, params)  # every prompt now from the prefix cache
    assert small.engine.stats().prefix_cache_hit_tokens > 0 and [o.text for o in again] == roomy
    assert_no_leak(small)


def test_each_of_n_completions_has_its_own_matcher(tiny):
    out = tiny.generate("A person:", constrained({"json": PERSON}, n=6, seed=7))[0]
    texts = [c.text for c in out.outputs]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1
    assert_no_leak(tiny)


def test_max_tokens_truncates_with_length_and_stop_strings_still_stop(tiny):
    out = tiny.generate("A person:", constrained({"json": PERSON}, max_tokens=5, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)  # a truncated object: the client sees "length" and knows
    out = tiny.generate("Say:", constrained({"choice": ["hello world"]}, stop=["world"]))[0]
    assert out.text == "hello " and out.finish_reason == "stop"
    assert_no_leak(tiny)


@pytest.mark.parametrize("spec, message", [
    ({"regex": "(abc"}, "invalid regex: .*parenthesis"),
    ({"grammar": "root ::= foo"}, 'invalid grammar: .*"foo" is not defined'),
    ({"json": "{not json"}, "invalid json schema: not valid JSON"),
    ({"json": {"type": "object", "required": "name"}}, "invalid json schema: required must be an array"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "invalid json schema: .*minimum greater than maximum"),
])  # fmt: skip
def test_invalid_specs_raise_value_error_naming_the_problem(tiny, spec, message):
    good = constrained({"regex": "[ab]{3}"}, temperature=0)
    with pytest.raises(ValueError, match=message):
        tiny.generate(["ok", "bad"], [good, constrained(spec)])  # all or nothing: nothing was queued
    assert_no_leak(tiny)
    assert re.fullmatch("[ab]{3}", tiny.generate("ok", good)[0].text)  # and the engine keeps serving


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"json": 3}, "json must be a schema"),
])  # fmt: skip
def test_malformed_spec_is_refused_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutput(**fields)
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured=fields)  # the dict form, as a server passes it


def test_bitmask_masks_only_constrained_rows_to_the_grammars_tokens(tiny):
    engine = tiny.engine
    tok = engine.tokenizer
    matcher = engine.grammars.matcher(StructuredOutput(choice=["Hello", "Paris"]))
    logits = torch.randn(3, engine.vocab_size)
    before = logits.clone()
    TokenBitmask().apply(logits, [None, matcher, None])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    assert allowed and all(torch.equal(logits[1, t], before[1, t]) for t in allowed)
    # Exactly the tokens that start "Hello" or "Paris".
    want = {t for t in range(tok.vocab_size) if (s := tok.decode([t])) and ("Hello".startswith(s) or "Paris".startswith(s))}
    assert allowed == want
    # Through the sampler: the greedy pick of the constrained row is one of them.
    row = SampleRow(SamplingParams(temperature=0), [1], [], matcher=matcher)
    assert Sampler()(before.clone()[1:2], [row]).token_ids[0] in want


def test_grammar_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        GrammarCompiler(None, 100, [2]).compile(StructuredOutput(regex="a"))
