"""Weights and tokenizer from a local HF directory, a hub id, a .gguf file, or random ("dummy") weights.

Every source yields full checkpoint tensors under their HF names, one at a time; each goes to its parameter's
`weight_loader` (layers.py), which copies this rank's shard of it (q/k/v into qkv_proj, gate/up into
gate_up_proj, a slice of heads / features / vocab under tensor parallelism). A pipeline stage is not given the
other stages' layers at all. Quantised models (quant.py): the layers get their quantised parameters before
loading, a pre-quantised checkpoint's tensors are re-laid to match on the way in, and full-precision weights
asked to be quantised are quantised once loaded.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import zlib
from typing import Callable, Iterator

import torch

from nanokyro import layers, quant, quant_formats
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.model import LlamaModel
from nanokyro.parallel import SINGLE, Group, Shard
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
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                          rope_theta=500000, max_position_embeddings=131072, tie_word_embeddings=False,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)),
}  # fmt: skip

_FUSED = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(\w+)$")  # weight, bias, qweight, ...
_SHARD_IDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": 0, "up_proj": 1}
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.*)")
_STAGE_PARAMS = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}  # on the first or the last stage only
log = logging.getLogger("nanokyro")


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


def read_config(cfg: EngineConfig) -> ModelConfig:
    """The model's shape alone, before anything is loaded (the parallel layout is checked against it)."""
    if cfg.load_format == "dummy":
        return ModelConfig.from_hf(_dummy_architecture(cfg.model))
    path = resolve_model_path(cfg.model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import read_gguf

        return ModelConfig.from_hf(read_gguf(path).hf_config)
    return ModelConfig.from_dir(path)


def load(cfg: EngineConfig, shard: Shard = Shard(), tp: Group = SINGLE, device: torch.device | None = None,
         with_tokenizer: bool = True) -> tuple[LlamaModel, Tokenizer | None, str]:  # fmt: skip
    """Build this rank's shard of the model on `device` (default: the engine's) and the engine's dtype; return
    it with its tokenizer (unless not wanted: the other ranks) and served name."""
    model, tokenizer, name = _load(cfg, shard, tp, device or cfg.torch_device(), with_tokenizer)
    qcfg = quant_formats.quant_config(model.cfg.quantization_config, cfg.quantization, cfg.quantize_lm_head)
    if with_tokenizer:  # once, on rank 0: this rank's shard
        log.info("weights: %.3f GB (%s)", quant.weight_bytes(model) / 1e9, "unquantised" if qcfg is None else
                 f"{qcfg.method}, {qcfg.fmt}" + (", LM head in fp8" if qcfg.lm_head else ""))  # fmt: skip
    if cfg.tokenizer is not None and with_tokenizer:
        tokenizer = Tokenizer.from_dir(cfg.tokenizer, eos_token_ids=model.cfg.eos_token_ids)
    return model, tokenizer, name


def _dummy_architecture(name: str | None) -> dict:
    if name not in DUMMY_ARCHITECTURES:
        raise ValueError(f"dummy weights need an architecture name: one of {sorted(DUMMY_ARCHITECTURES)}")
    return DUMMY_ARCHITECTURES[name]


def _load(cfg: EngineConfig, shard: Shard, tp: Group, device: torch.device,
          with_tokenizer: bool) -> tuple[LlamaModel, Tokenizer | None, str]:  # fmt: skip
    dtype = cfg.torch_dtype()
    speculates = cfg.speculative_model is not None or cfg.speculative_method is not None  # (a draft's config: no)
    rows = cfg.num_speculative_tokens + 1 if speculates else 1  # a verify step's rows (pack_for_cpu)
    if cfg.load_format == "dummy":  # quantised: the random weights, quantised at load
        model = build_model(ModelConfig.from_hf(_dummy_architecture(cfg.model)), device, dtype, shard, tp)
        load_weights(model, dummy_weights(model.cfg, cfg.seed, device, dtype, wanted(model)), cfg.quantization, rows,
                     cfg.quantize_lm_head)
        return model, None, cfg.model
    path = resolve_model_path(cfg.model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import DEFAULT_MODEL_NAME, read_gguf

        gg = read_gguf(path)
        model_cfg = ModelConfig.from_hf(gg.hf_config)
        tokenizer = _gguf_tokenizer(gg) if with_tokenizer else None
        model = build_model(model_cfg, device, dtype, shard, tp)
        load_weights(model, gg.load_weights(dtype, device, wanted(model)), cfg.quantization, rows,
                     cfg.quantize_lm_head)
        name = DEFAULT_MODEL_NAME if cfg.model is None else os.path.basename(path).removesuffix(".gguf")
        return model, tokenizer, name
    model_cfg = ModelConfig.from_dir(path)
    model = build_model(model_cfg, device, dtype, shard, tp)
    load_weights(model, iter_safetensors(path, device, dtype, wanted(model)), cfg.quantization, rows,
                 cfg.quantize_lm_head)
    tokenizer = Tokenizer.from_dir(path, eos_token_ids=model_cfg.eos_token_ids) if with_tokenizer else None
    # A hub id is served under itself, as clients name it; a local directory under its own name.
    return model, tokenizer, os.path.basename(cfg.model.rstrip("/")) if os.path.exists(cfg.model) else cfg.model


def _gguf_tokenizer(gg) -> Tokenizer:
    return Tokenizer(gg.tokenizer, chat_template=gg.chat_template, bos_token=gg.bos_token, eos_token=gg.eos_token,
                     eos_token_ids=gg.eos_token_ids, add_bos_token=gg.add_bos_token)  # fmt: skip


def load_tokenizer(model: str | None) -> Tokenizer:
    """A model's tokenizer alone (no weights): model as EngineConfig.model takes it."""
    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import read_gguf

        return _gguf_tokenizer(read_gguf(path))
    return Tokenizer.from_dir(path, eos_token_ids=ModelConfig.from_dir(path).eos_token_ids)


def build_model(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype, shard: Shard = Shard(),
                tp: Group = SINGLE) -> LlamaModel:  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaModel(model_cfg, shard, tp).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def wanted(model: LlamaModel) -> Callable[[str], bool]:
    """Whether a checkpoint tensor (HF name) has a place in this model's pipeline stage: layers of other stages
    are never read."""

    def want(name: str) -> bool:
        m = _LAYER.match(name)
        return m is None or int(m[1]) in model.layer_range

    return want


def iter_safetensors(path: str, device: torch.device, dtype: torch.dtype,
                     wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
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
                if wanted is None or wanted(name):
                    t = f.get_tensor(name)
                    # Weights and biases to the engine's dtype; quantised tensors and their scales as they are.
                    dense = name.endswith((".weight", ".bias")) and t.is_floating_point() and t.element_size() > 1
                    yield name, t.to(dtype) if dense else t


@torch.no_grad()
def load_weights(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]], quantization: str | None = None,
                 rows: int = 1, quantize_lm_head: bool = False):  # fmt: skip
    """Hand each HF-named tensor to its parameter's weight_loader, which copies this rank's shard of it; with a
    quantised checkpoint or `quantization` asked for, through quant.py before and after (quant_formats.py
    re-lays the checkpoint's tensors on the way in; `quantize_lm_head`: the head's FP8 copy after). On the CPU,
    weights are then laid out for products of `rows` rows (layers.pack_for_cpu)."""
    qcfg = quant_formats.quant_config(model.cfg.quantization_config, quantization, quantize_lm_head)
    quant.prepare(model, qcfg)
    _load_tensors(model, quant_formats.checkpoint_tensors(qcfg, tensors))
    quant.finish(model, qcfg)
    layers.pack_for_cpu(model, rows)


def _load_tensors(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    cfg = model.cfg
    params = dict(model.named_parameters())
    first_layer = model.layer_range.start
    loaded = set()
    for name, tensor in tensors:
        name = name.removeprefix("model.")
        if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
            continue
        m = _LAYER.match(name)
        if m:
            if int(m[1]) not in model.layer_range:
                continue
            name = f"layers.{int(m[1]) - first_layer}.{m[2]}"
        targets = [name]
        if name == "embed_tokens.weight" and cfg.tie_word_embeddings and "lm_head.weight" in params:
            targets.append("lm_head.weight")  # a tied head on a later pipeline stage than the embedding
        for target in targets:
            shard_id = None
            m = _FUSED.match(target)
            if m:
                prefix, proj, kind = m.groups()
                target = f"{prefix}.{'qkv_proj' if proj in ('q_proj', 'k_proj', 'v_proj') else 'gate_up_proj'}.{kind}"
                shard_id = _SHARD_IDS[proj]
            param = params.get(target)
            if param is None:
                if target in _STAGE_PARAMS and model.shard.pp_size > 1:
                    continue  # another stage's
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
            if hasattr(param, "weight_loader"):  # the linear layers and embeddings: this rank's shard of it
                param.weight_loader(param, tensor, shard_id)
            else:  # norms: whole on every rank
                param.copy_(tensor)
            loaded.add(target)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def dummy_weights(cfg: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype,
                  wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Random HF-named tensors with the scale of a trained model, so activations and logits stay finite. Each is
    drawn from a generator seeded by `seed` and its name: every rank's shards come from the same full model."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_heads * d, h), "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h), "self_attn.o_proj.weight": (h, cfg.num_heads * d),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
    }  # fmt: skip
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (cfg.num_heads * d,), "self_attn.k_proj.bias": (cfg.num_kv_heads * d,),
                  "self_attn.v_proj.bias": (cfg.num_kv_heads * d,)}  # fmt: skip
    if cfg.o_bias:
        layer["self_attn.o_proj.bias"] = (h,)
    if cfg.qk_norm:
        layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    shapes |= {f"layers.{i}.{k}": v for i in range(cfg.num_layers) for k, v in layer.items()}
    gen = torch.Generator(device=device)
    for name, shape in shapes.items():
        if not wanted(name):
            continue
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
