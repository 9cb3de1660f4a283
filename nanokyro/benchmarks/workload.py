"""The workload every mode runs and its floor on this machine.

The random token-id requests of the offline recipe, the engine options and HF config of the model under test,
the machine's two ceilings (memory bandwidth and matmul rate, measured at start-up), what the model must move
and compute per token, and the roofline: the least time the workload can take on this machine.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from nanokyro import LLM
from nanokyro.cli import engine_kwargs
from nanokyro.loader import DUMMY_ARCHITECTURES


def make_workload(num_prompts: int, input_len, output_len, vocab_size: int, seed: int):
    """Random prompts (token ids) and output lengths, uniform over the inclusive ranges."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1] + 1, num_prompts)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, num_prompts)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in in_lens]
    return prompts, [int(n) for n in out_lens]


# -- the model under test ------------------------------------------------------------------------------------


def hf_config(model: str | None) -> dict:
    """The HF config.json of a model nanokyro can load: a dummy architecture, an HF dir, or a GGUF file."""
    if model in DUMMY_ARCHITECTURES:
        return dict(DUMMY_ARCHITECTURES[model])
    from nanokyro.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        from nanokyro.gguf import read_gguf

        return dict(read_gguf(path).hf_config)
    with open(f"{path}/config.json") as f:
        return json.load(f)


def engine_options(args) -> dict:
    """The LLM keyword arguments bench.py's command line asks for: the engine's flags (cli.py), the seed and
    tokenizer, dummy weights for an architecture name, and slots for --num-loras' adapters."""
    opts = dict(engine_kwargs(args), seed=args.seed, tokenizer=args.tokenizer)
    if args.model in DUMMY_ARCHITECTURES:
        opts["load_format"] = "dummy"
    if getattr(args, "num_loras", None):
        opts.update(max_loras=args.num_loras, max_lora_rank=args.lora_rank)
    return opts


def write_random_adapters(llm: LLM, num: int, rank: int, root: str, seed: int = 0, first: int = 0) -> list[str]:
    """`num` PEFT LoRA directories of rank `rank` on all seven projections of the engine's model, with random
    weights (a delta of a few percent of each projection's output), registered as lora{first}, lora{first + 1}..."""
    from safetensors.torch import save_file

    from nanokyro.lora import _module_dims

    mc = llm.engine.runner.model_cfg
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(first, first + num):
        path = f"{root}/lora{i}"
        tensors = {}
        for layer in range(mc.num_layers):
            for module, (fan_in, fan_out) in _module_dims(mc).items():
                part = "self_attn" if module[0] in "qkvo" else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{module}"
                a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
                b = torch.randn(fan_out, rank, generator=gen) * 0.01
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.bfloat16(), b.bfloat16()
        os.makedirs(path, exist_ok=True)
        save_file(tensors, f"{path}/adapter_model.safetensors")
        with open(f"{path}/adapter_config.json", "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "bias": "none",
                       "target_modules": list(_module_dims(mc))}, f)  # fmt: skip
        llm.load_lora(f"lora{i}", path)
        names.append(f"lora{i}")
    return names


# -- the machine's two ceilings ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the work queued on the device (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_machine(device: torch.device, dtype: torch.dtype) -> dict:
    """Memory bandwidth (a large copy, bytes read + written) and matmul rate (square product, random data)."""
    cuda = device.type == "cuda"
    n_copy = (1 << 30) if cuda else (64 << 20)  # bytes per buffer
    src = torch.randn(n_copy // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device, 20 if cuda else 5)
    n = 8192 if cuda else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    mm_s = _time(lambda: a @ b, device, 20 if cuda else 3)
    del src, dst, a, b
    return {"bandwidth_bytes_per_s": 2 * n_copy / copy_s, "matmul_flops_per_s": 2 * n**3 / mm_s}


# -- what the workload must move and compute -----------------------------------------------------------------


def model_costs(llm: LLM) -> dict:
    """Bytes of weights one step reads (quantised layers and an FP8 LM head at their packed size, scales included),
    KV bytes per token, and matmul parameters per token and per logit row: of rank 0's shard (its TP slice of its
    pipeline stage), so that over one GPU's ceilings they bound a layout whose ranks share the work evenly."""
    model = llm.engine.runner.model
    cfg, shard = model.cfg, model.shard
    layers, kv_heads, heads = len(model.layers), shard.num_kv_heads(cfg), shard.num_heads(cfg)
    itemsize = model.embed_tokens.weight.dtype.itemsize
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight.numel()  # the whole table on TP rank 0 (layers.VocabParallelEmbedding)
    lm_head = math.ceil(cfg.vocab_size / shard.tp_size) * cfg.hidden_size  # the vocab projection's rows here
    # The embedding table is only gathered from (one row per token), but for the rows the head multiplies when it
    # is tied, here, and not through an FP8 copy (quantize_lm_head: a parameter of its own; an untied head's own
    # table is then freed). Every other weight is read.
    fp8_head = model.head is not None and model.head.head_scale is not None
    multiplied = model.head is model.embed_tokens and not fp8_head
    read = total - (embed - (lm_head if multiplied else 0)) * itemsize
    linear = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "multiply"))
    return {
        "weight_bytes": read,
        "kv_bytes_per_token": layers * 2 * kv_heads * cfg.head_dim * llm.engine.runner.kv_cache.dtype.itemsize,
        "matmul_params": linear,
        "lm_head_params": lm_head,
        "attn_flops_per_pair": 4 * layers * heads * cfg.head_dim,  # QK^T + PV per (query, key)
    }


def roofline(costs: dict, in_lens: list[int], out_lens: list[int], max_num_seqs: int, machine: dict) -> dict:
    """A lower bound on the workload's time: max(bytes / bandwidth, FLOPs / matmul rate), summed over the run.

    Steps: at least the longest output, and enough to emit every token at max_num_seqs per step; each reads the
    weights once. Decode step j of a request (j = 1 .. out-1) reads its in + j cached tokens. FLOPs: the linear
    layers over every computed token, the vocab projection over every sampled one, causal prefill attention
    and decode attention over the cached context.
    """
    ins, outs = np.asarray(in_lens, dtype=np.float64), np.asarray(out_lens, dtype=np.float64)
    steps = max(outs.max(), math.ceil(outs.sum() / max_num_seqs))
    kv_read_tokens = ((outs - 1) * ins + (outs - 1) * outs / 2).sum()
    kv_written_tokens = (ins + outs - 1).sum()
    bytes_ = steps * costs["weight_bytes"] + (kv_read_tokens + kv_written_tokens) * costs["kv_bytes_per_token"]
    computed = (ins + outs - 1).sum()
    flops = (
        2 * costs["matmul_params"] * computed
        + 2 * costs["lm_head_params"] * outs.sum()
        + costs["attn_flops_per_pair"] * ((ins * (ins + 1) / 2).sum() + kv_read_tokens)
    )
    memory_s, compute_s = bytes_ / machine["bandwidth_bytes_per_s"], flops / machine["matmul_flops_per_s"]
    return {"bytes": float(bytes_), "flops": float(flops), "memory_s": memory_s, "compute_s": compute_s,
            "floor_s": max(memory_s, compute_s)}  # fmt: skip
