"""GGUF reading: dequantisers against the gguf package's reference, the default model's config, weights and
tokenizer against what `transformers` loads from the same file, and tokenizers of small GGUF files we write."""
import functools
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize

from nanokyro.gguf import DEFAULT_MODEL_NAME, DEQUANTIZERS, dequantize, find_default_gguf, read_gguf

# byte offsets of the fp16 scales in each block; random bytes there could be inf/nan, so we write real ones
SCALE_OFFSETS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
                 Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a [rows, cols] tensor of type `qtype` (gguf's byte shape [rows, bytes_per_row])."""
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        top_halves = rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16
        return top_halves.astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal((len(raw), 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def test_every_supported_type_is_tested():
    assert set(DEQUANTIZERS) == {Q.F32, Q.F16, Q.BF16, *SCALE_OFFSETS}


@pytest.mark.parametrize("qtype", list(DEQUANTIZERS), ids=lambda t: t.name)
def test_dequantizer_matches_gguf_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    raw = random_blocks(qtype, rows, cols, rng)
    expected = torch.from_numpy(reference_dequantize(raw, qtype).astype(np.float32))
    ours = dequantize(torch.from_numpy(raw), qtype, (rows, cols))
    assert ours.shape == (rows, cols) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_dequantizer_inverts_gguf_quantize(qtype):
    x = np.random.default_rng(0).standard_normal((8, 256), dtype=np.float32)
    raw = reference_quantize(x, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, x.shape)
    assert torch.equal(ours, torch.from_numpy(reference_dequantize(raw, qtype)))
    step = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15, Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 31}[qtype]
    assert (ours - torch.from_numpy(x)).abs().max() <= step * np.abs(x).max() * 1.01 + 1e-6


def test_unsupported_tensor_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported GGUF tensor type Q2_K"):
        dequantize(torch.zeros(84, dtype=torch.uint8), Q.Q2_K, (256,))


# ---------------------------------------------------------------------------------------------------------
# The default model against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_path():
    return find_default_gguf()


@pytest.fixture(scope="module")
def ours(default_path):
    return read_gguf(default_path)


@pytest.fixture(scope="module")
def hf_model(hf_default_model):
    return hf_default_model


@pytest.fixture(scope="module")
def hf_tokenizer(default_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_path), gguf_file=os.path.basename(default_path))


def test_default_model_is_the_packaged_smollm2(default_path):
    assert os.path.basename(default_path) == f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
    assert os.path.getsize(default_path) > 50_000_000


def test_config_matches_transformers(ours, hf_model):
    hf = hf_model.config
    cfg = ours.hf_config
    assert cfg["model_type"] == hf.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5 and hf.rms_norm_eps == pytest.approx(1e-5)
    assert cfg["rope_scaling"] is None
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (9, 3, True)


def test_weights_match_transformers_tensor_by_tensor(ours, hf_model):
    """Proves the dequantisation (Q4_1, Q8_0, F32 in this file) and the q/k permutation undo."""
    expected = hf_model.state_dict()
    seen = set()
    for name, w in ours.load_weights(torch.float32, "cpu"):
        assert w.dtype == torch.float32 and w.shape == expected[name].shape, name
        assert torch.equal(w, expected[name]), name
        seen.add(name)
    # tied: transformers lists lm_head.weight (the embedding), the file has no output.weight
    assert seen == set(expected) - {"lm_head.weight"}
    assert len(seen) == 2 + 30 * 9


def test_weights_load_in_requested_dtype(ours, hf_model):
    """In bf16, each tensor is transformers' (dequantised in fp32) rounded to bf16 once."""
    expected = hf_model.state_dict()
    for name, w in itertools.islice(ours.load_weights(torch.bfloat16, "cpu"), 12):  # the table, a layer and more
        assert w.dtype == torch.bfloat16 and torch.equal(w, expected[name].to(torch.bfloat16)), name


def test_attention_weights_are_unpermuted_from_llama_cpp_order(ours, hf_model):
    # Rows of q come back in HF's rotate-half order, which is not the file's pairwise order.
    raw = next(t for t in ours.reader.tensors if t.name == "blk.0.attn_q.weight")
    file_order = dequantize(torch.from_numpy(raw.data), raw.tensor_type, (576, 576))
    hf_q = hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(file_order, hf_q)
    assert torch.equal(file_order[1], hf_q[32])  # head 0: file row 1 is HF row head_dim / 2


CORPUS = [
    "Hello world! How are you doing today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Numbers: 12345, 3.14159 and 1,000,000",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "   leading spaces\t\ttabs\n\n\nnewlines    trailing   ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>they'll we've I'M don't",
    "",
]


def test_tokenizer_matches_transformers_on_mixed_corpus(ours, hf_tokenizer):
    for text in CORPUS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf_tokenizer.encode(text), text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text


def test_tokenizer_keeps_special_tokens_whole(ours):
    enc = ours.tokenizer.encode("<|im_start|>user<|im_end|>")
    assert enc.ids == [1, 4093, 2]


def test_smollm_pre_tokenizer_isolates_every_numeric_char(ours, hf_tokenizer):
    # smollm splits each \p{N} char off before GPT-2's regex (llama.cpp; the model's own tokenizer.json does the
    # same with Digits(individual_digits)). transformers' GGUF tokenizer knows no `smollm` and keeps " ²" whole.
    assert ours.tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert ours.tokenizer.encode("x ²").tokens == ["x", "Ġ", "Â²"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("x ²")) == ["x", "ĠÂ", "²"]


def test_default_model_special_tokens_and_chat_template(ours):
    assert (ours.bos_token, ours.eos_token, ours.eos_token_ids, ours.add_bos_token) == (
        "<|im_start|>", "<|im_end|>", [2], False)
    assert "<|im_start|>" in ours.chat_template and "messages" in ours.chat_template


# ---------------------------------------------------------------------------------------------------------
# Small GGUF files written here: a SentencePiece (`llama`) vocabulary and byte-level BPE ones with the
# qwen2 and llama-bpe pre-tokenizers, each trained on a tiny corpus, checked against transformers.
# ---------------------------------------------------------------------------------------------------------

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. They'll say it's 2024, we've got 1234567 reasons.",
    "def add(a, b):\n    return a + b  # sum of 12 and 345\n\nprint(add(1, 2))",
    "人工智能正在改变世界。机器学习和深度学习是人工智能的分支。",
    "Tokenizers split text into pieces; merges join the most frequent pairs first.",
    "  indented   text with    runs of spaces\tand\ttabs\n\n\n and newlines 3.14159 100,000",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL_CORPUS = [
    "Hello world! How are you?",
    "The lazy dog jumps over 1234567 quick foxes.",
    "def f(x):\n    return x * 2  # double\n",
    "机器学习的世界 and emoji 😀 café",
    "   spaces   and\ttabs\n\nnewlines  ",
    "<|im_start|>user\nWhat's 12+345?<|im_end|>\n<|im_start|>assistant\n",
    "they'll WE'VE it's",
]


def write_gguf(path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, Q]] | None = None) -> str:
    """A GGUF file with `metadata`, `tensors` ({name: (float32 array, type)}) and default hyper-parameters."""
    w = GGUFWriter(path, arch)
    for name, (array, qtype) in (tensors or {}).items():
        w.add_tensor(name, reference_quantize(array, qtype), raw_dtype=qtype)
    hparams = {"block_count": 1, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
               "attention.head_count": 4, "attention.head_count_kv": 2,
               "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}
    for key, value in {**{f"{arch}.{k}": v for k, v in hparams.items()}, **metadata}.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, control_symbols=SPECIALS, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", "llama", {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    })
    return path, sp


def test_sentencepiece_gguf_tokenizer_matches_transformers_and_sentencepiece(sentencepiece_gguf):
    path, sp = sentencepiece_gguf
    ours, hf = read_gguf(path), transformers_tokenizer(path)
    assert ours.add_bos_token and ours.bos_token == "<s>"  # no add_bos_token key: llama.cpp's default for SPM
    for text in SMALL_CORPUS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf.encode(text), text
        assert ids[0] == sp.bos_id()
        assert ours.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        # sentencepiece itself never matches control symbols in text, and prepends "▁" even to text that starts
        # with a space, where transformers' Metaspace (and so ours) does not
        if not any(s in text for s in SPECIALS) and not text[0].isspace():
            assert ids[1:] == sp.encode(text), text
            assert ours.tokenizer.decode(ids) == text
    emoji = ours.tokenizer.encode("😀").tokens  # not in the vocabulary: byte fallback
    assert emoji == ["<s>", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@functools.cache
def train_byte_level_bpe() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TRAIN_TEXT, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_gguf_tokenizer_matches_transformers(pre, tmp_path):
    tokens, merges = train_byte_level_bpe()
    path = write_gguf(tmp_path / f"{pre}.gguf", "qwen2" if pre == "qwen2" else "llama", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": pre == "llama-bpe",
        "tokenizer.chat_template": "{{ messages }}",
    })
    ours, hf = read_gguf(path), transformers_tokenizer(path)
    assert ours.hf_config["model_type"] == ("qwen2" if pre == "qwen2" else "llama")
    for text in SMALL_CORPUS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf.encode(text), text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == hf.decode(ids) == \
            ("<|endoftext|>" if pre == "llama-bpe" else "") + text
    # qwen2 splits numbers into single digits, llama3 into runs of up to three
    pieces = [p for p, _ in ours.tokenizer.pre_tokenizer.pre_tokenize_str("x 1234567")]
    assert pieces == (["x", "Ġ", *"1234567"] if pre == "qwen2" else ["x", "Ġ", "123", "456", "7"])


# ---------------------------------------------------------------------------------------------------------
# Small random models of each architecture, written as GGUF the way llama.cpp's converter does
# ---------------------------------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{GGUF_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[
        ".".join(parts[:-1])] + "." + parts[-1]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: per head, rotate-half order -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, head_dim, factor, low, high, original_ctx) -> np.ndarray:
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((original_ctx / wavelen - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_small_model_weights_and_config_round_trip(arch, tmp_path):
    import transformers
    tokens, merges = train_byte_level_bpe()
    common = dict(vocab_size=len(tokens), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=512,
                  tie_word_embeddings=arch == "qwen3")
    config = {"llama": lambda: transformers.LlamaConfig(**common, rope_theta=500000.0),
              "qwen2": lambda: transformers.Qwen2Config(**common, rope_theta=1000000.0),
              "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)}[arch]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    state = {k: v.numpy() for k, v in hf.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}

    tensors = {}
    for name, w in state.items():
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            w = llama_cpp_permute(w, 2 if "q_proj" in name else 1)
        tensors[gguf_name(name)] = (w, Q.Q8_0 if w.ndim == 2 else Q.F32)
    head_dim = 32 if arch == "qwen3" else 64
    metadata = {f"{arch}.{k}": v for k, v in {
        "block_count": 2, "context_length": 512, "embedding_length": 128, "feed_forward_length": 256,
        "attention.head_count": 2, "attention.head_count_kv": 1, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 500000.0 if arch == "llama" else 1000000.0, "attention.key_length": head_dim}.items()}
    if arch == "llama":  # Llama 3.1-style rope scaling, which llama.cpp stores as per-frequency factors
        tensors["rope_freqs.weight"] = (llama3_rope_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192), Q.F32)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, {
        **metadata, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 1,
    }, tensors)

    model = read_gguf(path)
    cfg = model.hf_config
    expected = {"model_type": arch, "vocab_size": len(tokens), "hidden_size": 128, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
                "tie_word_embeddings": arch == "qwen3", "bos_token_id": None, "eos_token_id": [2, 1]}
    assert {k: cfg[k] for k in expected} == expected
    assert model.eos_token_ids == [2, 1]
    if arch == "llama":
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
        assert cfg["rope_scaling"]["low_freq_factor"] == pytest.approx(1.0, rel=1e-4)
        assert cfg["rope_scaling"]["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    else:
        assert cfg["rope_scaling"] is None

    loaded = dict(model.load_weights(torch.float32, "cpu"))
    assert set(loaded) == set(state)
    for name, w in state.items():
        qtype = Q.Q8_0 if w.ndim == 2 else Q.F32  # quantising rows commutes with permuting them
        expected_w = torch.from_numpy(reference_dequantize(reference_quantize(w, qtype), qtype))
        assert torch.equal(loaded[name], expected_w), name


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    tokens, merges = train_byte_level_bpe()
    path = write_gguf(tmp_path / "gemma.gguf", "gemma", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
        read_gguf(path)
