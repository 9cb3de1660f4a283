"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers loading the same file."""
from __future__ import annotations

import pytest
import torch

from conftest import ServerThread, assert_logits_match
from nanokyro import LLM, SamplingParams
from nanokyro.config import EngineConfig
from nanokyro.server import create_app

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", kv_cache_memory=64 << 20, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def hf_model(hf_default_model):
    return hf_default_model


def chat_ids(llm, text):
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_default_model_is_served_under_its_name(llm):
    assert llm.engine.model_name == "SmolLM2-135M-Instruct"


def test_logits_match_transformers(llm, hf_model):
    # Plain prompts with no common first page, so the prefix cache lets all of them into one flat batch.
    assert_logits_match(llm, hf_model, [llm.tokenizer.encode(p) for p in PROMPTS], tol=2e-3)


def test_greedy_chat_answers_match_transformers(llm, hf_model):
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], SamplingParams(max_tokens=32, temperature=0))
    for text, out in zip(PROMPTS, outs):
        ids = chat_ids(llm, text)
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == ref
    assert "Paris" in outs[0].text


def test_http_chat_answers_paris():
    """The whole path a new user takes: the default model behind the HTTP API, asked through the openai SDK."""
    srv = ServerThread(create_app(EngineConfig(dtype="float32", kv_cache_memory=64 << 20)))
    try:
        client = srv.client(key="unused")
        [model] = [m.id for m in client.models.list().data]
        assert model == "SmolLM2-135M-Instruct"
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
            max_tokens=32,
        )  # fmt: skip
        assert "Paris" in answer.choices[0].message.content
    finally:
        srv.stop()
