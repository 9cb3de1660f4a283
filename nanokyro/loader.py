"""Weights and tokenizer from a local HF directory, a hub id, a .gguf file, or random ("dummy") weights.

Checkpoint tensors arrive under their HF names and are copied into the model's fused parameters
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) directly on the target device and dtype.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator

import torch

from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.model import LlamaModel
from nanokyro.tokenizer import Tokenizer

# Shapes of well-known models, for benchmarks on machines that have no weights (load_format="dummy").
DUMMY_ARCHITECTURES = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1000000, max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=500000, max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}  # fmt: skip

_FUSED = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


def resolve_model_path(model: str | None) -> str:
    """None -> the embedded default GGUF; a local dir or file -> itself; anything else -> a hub id."""
    if model is None:
        from nanokyro.gguf import find_default_gguf

        return find_default_gguf()
    if os.path.exists(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        # consolidated*.safetensors: the original (non-HF) weights some repos ship beside the HF shards
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
                                 ignore_patterns=["consolidated*"])
    except Exception as e:
        raise FileNotFoundError(f"{model!r} is neither a local path nor a reachable hub model: {e}") from e


def load(cfg: EngineConfig) -> tuple[LlamaModel, Tokenizer | None, str]:
    """Build the model on the engine's device and dtype; return it with its tokenizer and served name."""
    model, tokenizer, name = _load(cfg)
    if cfg.tokenizer is not None:
        tokenizer = Tokenizer.from_dir(cfg.tokenizer, eos_token_ids=model.cfg.eos_token_ids)
    return model, tokenizer, name


def _load(cfg: EngineConfig) -> tuple[LlamaModel, Tokenizer | None, str]:
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    if cfg.load_format == "dummy":
        if cfg.model not in DUMMY_ARCHITECTURES:
            raise ValueError(f"dummy weights need an architecture name: one of {sorted(DUMMY_ARCHITECTURES)}")
        model = build_model(ModelConfig.from_hf(DUMMY_ARCHITECTURES[cfg.model]), device, dtype)
        init_dummy_weights(model, cfg.seed)
        return model, None, cfg.model
    path = resolve_model_path(cfg.model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import DEFAULT_MODEL_NAME, read_gguf

        gg = read_gguf(path)
        model_cfg = ModelConfig.from_hf(gg.hf_config)
        tokenizer = Tokenizer(
            gg.tokenizer, chat_template=gg.chat_template, bos_token=gg.bos_token, eos_token=gg.eos_token,
            eos_token_ids=gg.eos_token_ids, add_bos_token=gg.add_bos_token,
        )  # fmt: skip
        model = build_model(model_cfg, device, dtype)
        load_weights(model, gg.load_weights(dtype, device))
        name = DEFAULT_MODEL_NAME if cfg.model is None else os.path.basename(path).removesuffix(".gguf")
        return model, tokenizer, name
    model_cfg = ModelConfig.from_dir(path)
    model = build_model(model_cfg, device, dtype)
    load_weights(model, iter_safetensors(path, device, dtype))
    tokenizer = Tokenizer.from_dir(path, eos_token_ids=model_cfg.eos_token_ids)
    # A hub id is served under itself, as clients name it; a local directory under its own name.
    return model, tokenizer, os.path.basename(cfg.model.rstrip("/")) if os.path.exists(cfg.model) else cfg.model


def build_model(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaModel(model_cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def iter_safetensors(path: str, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # the shards the index names, and no other .safetensors lying beside them
        with open(index) as f:
            files = sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    else:
        files = [f for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))
                 if not os.path.basename(f).startswith("consolidated")]  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)


@torch.no_grad()
def load_weights(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model, slicing q/k/v and gate/up into their fused parameters."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    offsets = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
               "gate_proj": (0, cfg.intermediate_size), "up_proj": (cfg.intermediate_size, cfg.intermediate_size)}  # fmt: skip
    loaded = set()
    for name, tensor in tensors:
        name = name.removeprefix("model.")
        if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
            continue
        m = _FUSED.match(name)
        if m:
            prefix, proj, kind = m.groups()
            fused = "qkv_proj" if proj in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
            target = f"{prefix}.{fused}.{kind}"
            start, size = offsets[proj]
            params[target][start : start + size].copy_(tensor)
            loaded.add(target)
            continue
        if name not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


@torch.no_grad()
def init_dummy_weights(model: LlamaModel, seed: int) -> None:
    """Random weights with the scale of a trained model, so activations and logits stay finite."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
