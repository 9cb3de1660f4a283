"""The engine's command-line flags, one declaration for serve.py and bench.py: `add_engine_args` puts them on a
parser (their defaults are EngineConfig's), `engine_kwargs` turns the parsed flags back into EngineConfig's keyword
arguments. No torch here: serve.py's HTTP frontend imports it."""
from __future__ import annotations

import argparse
import re

from nanokyro.config import EngineConfig


def parse_bytes(text: str) -> int:
    """'16777216', '512M', '4G' or '4GiB' -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 4G)")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def parse_lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_steps(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), steps A up to but not including B, 0 <= A < B."""
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A < B, got {text!r}")
    return int(m[1]), int(m[2])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags (all but --model, whose help differs between the two commands)."""
    d = EngineConfig()
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"],
                   help="activation and KV dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most sequences in one step; with --pipeline-parallel-size P, P steps of this many run at once "
                        "(default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget shared by decodes and prefill chunks (default %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="CUDA: fraction of GPU memory to fill with weights and KV cache (default %(default)s)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=d.kv_cache_memory,
                   help="KV-cache size in bytes (512M, 4G); the CPU default is 1 GiB, CUDA sizes it from free memory")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default=d.kv_cache_dtype,
                   help="fp8: keys and values in float8 e4m3 (scale 1), twice the tokens in the same memory")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="longest prompt + completion in tokens; default: the model's own limit")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="dummy: random weights for an architecture name given as --model (e.g. qwen3-0.6b)")
    p.add_argument("--quantization", choices=["fp8", "awq"], default=d.quantization,
                   help="quantise full-precision weights at load: fp8 (per-channel) or awq (4-bit, groups of 128); "
                        "pre-quantised checkpoints (FP8, AWQ, compressed-tensors) are detected without it")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with FP8 weights (--quantization fp8 or an FP8 checkpoint): the LM head in per-channel FP8 "
                        "too, half the bytes of bf16; off by default, as the head's error lands on the logits")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="ranks (GPUs) each layer is split over (default %(default)s)")
    p.add_argument("--pipeline-parallel-size", type=int, default=d.pipeline_parallel_size,
                   help="pipeline stages the layers are split into (default %(default)s)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs or torch.compile")
    p.add_argument("--no-overlap-schedule", action="store_true",
                   help="run steps one at a time (by default the host handles a step's tokens while the next runs)")
    spec = p.add_argument_group("speculative decoding")
    spec.add_argument("--speculative-model", default=d.speculative_model,
                      help="a draft model with the same tokenizer (anything --model takes)")
    spec.add_argument("--speculative-method", choices=["draft", "ngram", "grammar"], default=d.speculative_method,
                      help="draft (with --speculative-model), ngram (prompt lookup), or grammar (structured outputs "
                           "only, drafting the text their grammar forces; the others do that too)")  # fmt: skip
    spec.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens,
                      help="tokens proposed per speculative step (default %(default)s)")
    spec.add_argument("--speculative-max-batch", type=int, default=d.speculative_max_batch,
                      help="speculate only while at most this many sequences run (default %(default)s)")
    spec.add_argument("--speculative-draft-vocab", type=int, default=d.speculative_draft_vocab,
                      help="the draft scores only the first N token ids (a cheaper draft)")
    spec.add_argument("--speculative-draft-quantization", choices=["int8"], default=d.speculative_draft_quantization,
                      help="CPU: the draft's weights in int8 (fbgemm; a cheaper draft, output unchanged)")
    lora = p.add_argument_group("multi-LoRA")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", type=parse_lora_module,
                      help="LoRA adapters (PEFT directories) to serve from the start; a request picks one with its "
                           "`model` field (NAME or BASE:NAME)")  # fmt: skip
    lora.add_argument("--max-loras", type=int, default=None,
                      help="LoRA adapters resident on the device at once (more may be loaded; they are swapped in "
                           "LRU). Default: 4 with --lora-modules, else 0 (LoRA off; POST /v1/load_lora_adapter needs "
                           "it on)")  # fmt: skip
    lora.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest adapter rank accepted")
    prof = p.add_argument_group("profiling")
    prof.add_argument("--profile-dir", default=d.profile_dir,
                      help="every rank profiles steps --profile-steps with torch.profiler into DIR/rank{r}.json (a "
                           "chrome trace) and DIR/rank{r}.txt (mean wall, host and kernel-busy ms a step)")
    prof.add_argument("--profile-steps", type=parse_steps, default=d.profile_steps, metavar="A:B",
                      help="with --profile-dir: the steps each rank profiles, counted from its start, A up to but not "
                           f"including B (default {d.profile_steps[0]}:{d.profile_steps[1]})")  # fmt: skip


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's keyword arguments for the flags `add_engine_args` declared."""
    return dict(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len, load_format=args.load_format,
        quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        enforce_eager=args.enforce_eager, overlap_schedule=not args.no_overlap_schedule,
        speculative_model=args.speculative_model, speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens, speculative_max_batch=args.speculative_max_batch,
        speculative_draft_vocab=args.speculative_draft_vocab,
        speculative_draft_quantization=args.speculative_draft_quantization, lora_modules=dict(args.lora_modules),
        max_loras=args.max_loras if args.max_loras is not None else 4 if args.lora_modules else 0,
        max_lora_rank=args.max_lora_rank, profile_dir=args.profile_dir, profile_steps=args.profile_steps,
    )  # fmt: skip


def engine_flags(kwargs: dict) -> list[str]:
    """The flags that give `add_engine_args`' parser these EngineConfig keyword arguments (the inverse of
    `engine_kwargs`; values at EngineConfig's defaults are left out)."""
    d, flags = EngineConfig(), []
    for name, value in kwargs.items():
        if value == getattr(d, name):
            continue
        if name == "overlap_schedule":
            flags.append("--no-overlap-schedule")
        elif name in ("enforce_eager", "quantize_lm_head"):  # switches
            flags.append(f"--{name.replace('_', '-')}")
        elif name == "lora_modules":
            flags += ["--lora-modules", *(f"{k}={v}" for k, v in value.items())]
        elif name == "profile_steps":
            flags += ["--profile-steps", f"{value[0]}:{value[1]}"]
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags
