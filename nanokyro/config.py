"""Configuration: the model's shape (from an HF config.json or GGUF metadata) and the engine's knobs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


# HF `model_type` -> the family name nanokyro uses. All are the same decoder; the differences are flags.
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2, or attention_bias=True)
    o_bias: bool = False  # o_proj carries a bias (attention_bias=True)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    torch_dtype: str = "bfloat16"  # the checkpoint's own dtype
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization_config: dict | None = None  # config.json's, for pre-quantised checkpoints (quant.py)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r}; nanokyro serves {sorted(ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers 5 folds theta and scaling into one dict
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            architecture=ARCHITECTURES[model_type],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta or 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=bool(cfg.get("attention_bias")) or model_type == "qwen2",
            o_bias=bool(cfg.get("attention_bias")),
            qk_norm=model_type == "qwen3",
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", ""),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
            quantization_config=cfg.get("quantization_config") or None,
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf(json.load(f))


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, hub id, or (with load_format="dummy") an architecture name
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # "auto" = cuda if available
    load_format: str = "auto"  # "auto" | "dummy"
    quantization: str | None = None  # "fp8" | "awq": quantise full-precision weights at load (quant.py)
    # The LM head in per-channel FP8 too, beside FP8 linear layers (quantization="fp8" or an FP8 checkpoint): half
    # of bf16's bytes read a step. Off by default, as in most FP8 checkpoints: the head's error lands on the logits.
    quantize_lm_head: bool = False
    tokenizer: str | None = None  # an HF tokenizer directory to use instead of the model's (e.g. with dummy weights)
    max_num_batched_tokens: int = 8192  # per-step token budget (decodes + prefill chunks)
    max_num_seqs: int = 256  # sequences in one step; with pipeline parallelism in each of the pp steps in flight
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    page_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache per rank (a draft model's included); CPU default 1 GiB
    # "auto": keys and values in the model's dtype; "fp8": float8 e4m3 with a scale of 1 (values clamped to +-448),
    # half of bf16's bytes, so twice the tokens fit (FlashInfer's decode is no faster on it: docs/PERFORMANCE.md).
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9  # on CUDA, fraction of the GPU the engine may fill (weights + KV)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # CUDA: no graphs, no torch.compile
    overlap_schedule: bool = True  # the host handles step n-1's tokens while the device runs step n (PP: one per stage)
    attention_backend: str = "auto"  # "auto" | "torch" | "flashinfer"
    tensor_parallel_size: int = 1  # ranks each layer is split over (heads, MLP features, vocab)
    pipeline_parallel_size: int = 1  # stages the layers are split into
    seed: int = 0
    served_model_name: str | None = None
    max_loras: int = 0  # LoRA adapters resident on the device at once (more may be registered); 0: LoRA off
    max_lora_rank: int = 64  # the largest adapter rank accepted (the slot buffers' size)
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapter name -> PEFT directory, registered at start
    # Speculative decoding (spec_decode.py): a draft model (same tokenizer) or "ngram" prompt lookup proposes
    # num_speculative_tokens tokens per step, verified by the model in one forward; only while at most
    # speculative_max_batch sequences run (past that the device is busy enough without it).
    speculative_model: str | None = None
    speculative_method: str | None = None  # "draft" (the default with a speculative_model) | "ngram" | "grammar"
    # ("grammar": structured outputs alone speculate, drafting the text their grammar forces; also with the others)
    num_speculative_tokens: int = 4
    speculative_max_batch: int = 16
    # A cheaper draft: its LM head over only the first N token ids (a BPE vocabulary's earliest merges, its most
    # frequent tokens); the model still verifies over the whole vocabulary, so output stays lossless.
    speculative_draft_vocab: int | None = None
    # A cheaper draft on the CPU: "int8" quantises the draft's linear layers and LM head at load (quant.py: fbgemm,
    # per-channel weights, dynamic activations); the model verifies in full precision, so output stays lossless.
    speculative_draft_quantization: str | None = None
    # Every rank profiles the steps it runs from profile_steps[0] up to but not including profile_steps[1] with
    # torch.profiler, into profile_dir/rank{r}.json (a chrome trace) and .txt (mean wall, host and kernel ms a step):
    # profiling.py.
    profile_dir: str | None = None
    profile_steps: tuple[int, int] = (20, 40)

    def spec_method(self) -> str | None:
        """The speculative proposer this config asks for (None: no speculation); a ValueError if inconsistent."""
        method = self.speculative_method or ("draft" if self.speculative_model else None)
        if method not in (None, "draft", "ngram", "grammar"):
            raise ValueError(f"speculative_method must be 'draft', 'ngram' or 'grammar', got {method!r}")
        if method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method 'draft' needs a speculative_model")
        if method in ("ngram", "grammar") and self.speculative_model:
            raise ValueError(f"speculative_method {method!r} takes no speculative_model")
        if method is not None and not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.speculative_draft_vocab is not None and (method != "draft" or self.speculative_draft_vocab < 1):
            raise ValueError("speculative_draft_vocab takes a positive token count, with a speculative_model")
        if self.speculative_draft_quantization is not None:
            if self.speculative_draft_quantization != "int8" or method != "draft":
                raise ValueError("speculative_draft_quantization takes 'int8', with a speculative_model, not "
                                 f"{self.speculative_draft_quantization!r}")  # fmt: skip
            if self.torch_device().type != "cpu":
                raise ValueError("speculative_draft_quantization 'int8' runs on the CPU only (fbgemm's kernels)")
        if self.quantization == "int8":
            raise ValueError("quantization 'int8' is for a speculative draft: speculative_draft_quantization='int8'")
        if method is not None and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding runs on one rank only (tensor/pipeline parallel size 1)")
        return method

    def torch_device(self):
        import torch  # here, not at the top: the server's frontend process reads this config without torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def kv_torch_dtype(self):
        """The KV cache's element type."""
        import torch

        if self.kv_cache_dtype == "auto":
            return self.torch_dtype()
        if self.kv_cache_dtype == "fp8":
            return torch.float8_e4m3fn
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', not {self.kv_cache_dtype!r}")

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, not {self.dtype!r}")
        return dtype
