"""One step on the device: build the flat batch and page tables, run the model, sample.

The runner owns the KV cache allocation and the attention backend. Everything it builds per step is made on
the host in numpy and crosses to the device in one copy.
"""
from __future__ import annotations

import numpy as np
import torch

from nanokyro.attention import AttentionMetadata, TorchAttention
from nanokyro.config import EngineConfig, ModelConfig
from nanokyro.model import LlamaModel
from nanokyro.sampler import Sampler, SamplerOutput, SampleRow
from nanokyro.scheduler import ScheduledBatch

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * page_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def num_kv_pages(model_cfg: ModelConfig, cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Pages that fit in `kv_cache_memory`, or on CUDA in what `gpu_memory_utilization` leaves after the weights."""
    budget = cfg.kv_cache_memory
    if budget is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_allocated(device)
        # Keep headroom for activations and logits of the largest step.
        activations = cfg.max_num_batched_tokens * (model_cfg.hidden_size * 24 + model_cfg.vocab_size * 4)
        budget = int(total * cfg.gpu_memory_utilization) - used_by_others - torch.cuda.memory_allocated(device) - activations
    elif budget is None:
        budget = CPU_DEFAULT_KV_BYTES
    pages = budget // kv_bytes_per_page(model_cfg, cfg.page_size, dtype)
    if pages < 2:
        raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 pages; raise kv_cache_memory")
    return int(pages)


def make_attention_backend(name: str, kv_cache: torch.Tensor, cfg: ModelConfig):
    if name == "auto":
        name = "flashinfer" if kv_cache.device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention(kv_cache, cfg.num_heads, cfg.head_dim)
    if name == "flashinfer":
        from nanokyro.attention import FlashInferAttention

        return FlashInferAttention(kv_cache, cfg.num_heads, cfg.head_dim)
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, flashinfer)")


class ModelRunner:
    def __init__(self, model: LlamaModel, cfg: EngineConfig, num_pages: int):
        self.model, self.cfg = model, cfg
        mc = model.cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.page_size = cfg.page_size
        self.kv_cache = torch.zeros(
            mc.num_layers, num_pages, 2, cfg.page_size, mc.num_kv_heads, mc.head_dim, dtype=self.dtype, device=self.device
        )
        self.attn = make_attention_backend(cfg.attention_backend, self.kv_cache, mc)
        self.sampler = Sampler()

    def prepare(self, batch: ScheduledBatch):
        """Host-side step inputs -> (input_ids, positions, AttentionMetadata, logits row indices) on the device."""
        ps = self.page_size
        ids, pos, slots, kv_indices = [], [], [], []
        q_lens, kv_lens, page_counts = [], [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            start, end = seq.num_computed, seq.num_computed + n
            p = np.arange(start, end)
            pages = np.asarray(seq.pages, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos.append(p)
            slots.append(pages[p // ps] * ps + p % ps)
            used = (end + ps - 1) // ps
            kv_indices.append(pages[:used])
            q_lens.append(n), kv_lens.append(end), page_counts.append(used)
        q_lens_np, kv_lens_np = np.asarray(q_lens), np.asarray(kv_lens)
        qo_indptr = np.concatenate([[0], np.cumsum(q_lens_np)])
        sample_rows = [qo_indptr[i + 1] - 1 for i in range(len(batch)) if batch.samples(i)]
        parts = [
            np.concatenate(ids), np.concatenate(pos), np.concatenate(slots), qo_indptr,
            np.concatenate([[0], np.cumsum(page_counts)]), np.concatenate(kv_indices),
            (kv_lens_np - 1) % ps + 1, kv_lens_np, np.asarray(sample_rows, dtype=np.int64),
        ]  # fmt: skip
        flat = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        input_ids, positions, slot_mapping, qo, kv_ptr, kv_idx, last_len, kv_len, rows = flat.split(
            [len(p) for p in parts]
        )
        i32 = torch.int32
        meta = AttentionMetadata(
            qo_indptr=qo.to(i32), kv_indptr=kv_ptr.to(i32), kv_indices=kv_idx.to(i32),
            kv_last_page_len=last_len.to(i32), kv_lens=kv_len.to(i32), slot_mapping=slot_mapping,
            q_lens=q_lens, kv_lens_host=kv_lens,
        )  # fmt: skip
        return input_ids, positions, meta, rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SamplerOutput:
        input_ids, positions, meta, rows = self.prepare(batch)
        self.attn.plan(meta)
        hidden = self.model(input_ids, positions, self.attn)
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        if not sampled:
            return SamplerOutput(token_ids=[], logprobs=None, top_logprobs=None)
        logits = self.model.compute_logits(hidden[rows])
        return self.sampler(
            logits.float(),
            [SampleRow(s.params, s.prompt_ids, s.output_ids, s.generator) for s in sampled],
        )
