"""Shared fixtures: tiny random models of each architecture, built and saved by `transformers` itself,
with a small byte-level BPE tokenizer trained here (no model hub on these machines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nanokyro import SamplingParams
from nanokyro.server import BackgroundServer

torch.set_num_threads(2)

VOCAB = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Hello, world! How are you today? I am fine, thank you.",
    "Large language models predict the next token from the previous ones.",
    "Emoji 😀🎉 and CJK 你好世界 and accents café naïve.",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2, tie_word_embeddings=False,
)  # fmt: skip


def run_in_interpreter(script: str, timeout: int = 300) -> str:
    """Run `script` in a fresh process with Triton's interpreter (TRITON_INTERPRET=1: the CUDA kernels on the
    CPU), and return the last word it printed; skips where Triton is not installed."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-1]


def save_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                   "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f)  # fmt: skip


def build_tiny_model(arch: str, path: str, **overrides) -> str:
    import transformers

    cls = {
        "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
    }[arch]  # fmt: skip
    cfg = cls(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny_model_dir(request, tmp_path_factory) -> str:
    return build_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def hf_llama(llama_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers loading the embedded default GGUF itself: the reference for GGUF loading (slow: ~15 s)."""
    import transformers

    from nanokyro.gguf import find_default_gguf

    path = find_default_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def mixed_params() -> list:
    """One request of each kind the schedule must keep intact: greedy, seeded sampling with logprobs, n > 1 with
    top-k, penalties, a single token, greedy past EOS."""
    return [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.9, seed=11, logprobs=2),
        SamplingParams(max_tokens=20, temperature=1.0, top_k=20, seed=5, n=2, ignore_eos=True),
        SamplingParams(max_tokens=28, temperature=0.8, seed=2, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    ]


def assert_logits_match(llm, hf_model, prompts: list[list[int]], tol: float) -> None:
    """All prompts in one flat forward (one step, no padding) give HF's logits at every position."""
    engine, runner = llm.engine, llm.engine.runner
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    assert batch.num_new == [len(p) for p in prompts]  # all prompts in one step
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(batch)
        runner.attn.plan(meta)
        logits = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn))
        start = 0
        for p in prompts:
            ref = hf_model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[start : start + len(p)], ref, atol=tol, rtol=tol)
            start += len(p)
    engine.fail_all()


def assert_no_leak(llm) -> None:
    """Every page is free (or idle in the prefix cache) and no request is left in the engine."""
    engine = llm.engine
    assert not engine.scheduler.has_work()
    assert not engine.requests
    assert engine.blocks.all_free(), f"pages still referenced: {[i for i, r in enumerate(engine.blocks.ref) if r]}"


KEY = "sk-test"


class ServerThread(BackgroundServer):
    """A real server on loopback (its engine core in a process of its own), with an openai client for it."""

    @property
    def core(self):
        """The frontend's CoreClient: the model's name, tokenizer, and the core's last published stats."""
        return self.app.state.server.client

    @property
    def model(self) -> str:
        return self.core.model_name

    def client(self, key=KEY, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30, **kw)
