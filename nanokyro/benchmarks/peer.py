"""The peer: HF transformers' continuous batching on the same workload, timed in this process."""
from __future__ import annotations

import gc
import time

import torch
from tqdm import tqdm

from nanokyro.benchmarks.workload import hf_config, sync


def run_hf_peer(model: str | None, dtype: torch.dtype, device: torch.device, prompts, out_lens) -> float:
    """HF transformers' continuous batching (the manager `generate_batch` wraps, so each request keeps its own
    max_new_tokens) on a random-weight model of the same architecture; timed after its warm-up."""
    import transformers

    cfg = hf_config(model)
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    gen = transformers.GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)  # fmt: skip
    with hf.continuous_batching_context_manager(generation_config=gen, block=True, timeout=10) as manager:
        sync(device)
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        bar = tqdm(total=len(prompts), desc="hf generate", unit="seq")
        while bar.n < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                assert len(result.generated_tokens) == out_lens[int(result.request_id[1:])]
                bar.update(1)
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching stopped early")
        bar.close()
        sync(device)
        elapsed = time.perf_counter() - start
    del hf, manager
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed
