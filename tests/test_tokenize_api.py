"""Token counting outside generation: vLLM's /tokenize and /detokenize against transformers' tokenizer, and a GGUF
model's tokenizer exported as an HF directory that transformers loads to the same ids as from the GGUF itself."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import transformers

from nanokyro.config import EngineConfig
from nanokyro.gguf import find_default_gguf
from nanokyro.server import create_app
from conftest import KEY, ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Hello, world!", "  leading spaces and a tab\t", "Emoji 😀 and CJK 你好", "def f(x):\n    return x * 2"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def served(llama_dir):
    srv = ServerThread(create_app(EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20),
                                  api_key=KEY))  # fmt: skip
    yield srv
    srv.stop()


def post(served, path: str, body: dict, key=KEY) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_tokenize_and_detokenize_agree_with_transformers(served, llama_dir):
    ref = transformers.AutoTokenizer.from_pretrained(llama_dir)
    for text in TEXTS:
        out = post(served, "/tokenize", {"model": served.model, "prompt": text, "return_token_strs": True}).json()
        assert out["tokens"] == ref(text).input_ids and out["count"] == len(out["tokens"])
        assert out["token_strs"] == ref.convert_ids_to_tokens(out["tokens"]) and out["max_model_len"] == 1024
        back = post(served, "/detokenize", {"tokens": out["tokens"]}).json()
        assert back == {"prompt": ref.decode(out["tokens"])}


def test_tokenize_messages_counts_what_the_chat_endpoint_sends_the_model(served, llama_dir):
    ref = transformers.AutoTokenizer.from_pretrained(llama_dir)
    out = post(served, "/tokenize", {"messages": CHAT}).json()
    assert out["tokens"] == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
                                                    )["input_ids"]  # fmt: skip
    chat = served.client().chat.completions.create(model=served.model, messages=CHAT, max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]
    without = post(served, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert without["count"] < out["count"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
    ("/tokenize", {"prompt": "a", "colour": "red"}, 400, "colour"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
])  # fmt: skip
def test_bad_tokenize_requests_are_openai_errors(served, path, body, status, param):
    r = post(served, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert post(served, path, body, key="wrong").status_code == 401


def test_an_exported_gguf_tokenizer_loads_in_transformers_to_the_gguf_s_own_ids(tmp_path):
    out = str(tmp_path / "tokenizer")
    subprocess.run([sys.executable, "serve.py", "--export-tokenizer", out], cwd=ROOT, check=True, timeout=300)
    gguf = find_default_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    exported = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert exported(text).input_ids == ref(text).input_ids
    assert exported.apply_chat_template(CHAT, tokenize=False) == ref.apply_chat_template(CHAT, tokenize=False)
    assert exported.eos_token == ref.eos_token
