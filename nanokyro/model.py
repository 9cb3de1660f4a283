"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a flat token batch.

Every forward sees `input_ids [T]` and `positions [T]`: the new tokens of all scheduled sequences laid end to
end with no padding, prefill chunks and decodes mixed. Attention reads and writes the paged KV cache through
the step's attention backend; logits are computed only for the rows that are sampled.

A model is one rank's `Shard`: its pipeline stage's layers (numbered from 0 within the stage), each split over
the TP group by the layers of layers.py; with one rank it is the whole model.
"""
from __future__ import annotations

import torch
from torch import nn

from nanokyro.config import ModelConfig
from nanokyro.layers import GateUpLinear, QKVLinear, RMSNorm, RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding
from nanokyro.parallel import SINGLE, Group, Shard


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: Group):
        super().__init__()
        self.layer_idx = layer_idx  # within this stage: the index of its KV cache
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, tp)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, positions, x, rope: RotaryEmbedding, attn, lora=None) -> tuple[torch.Tensor, bool]:
        """This rank's part of the output, not yet summed over the TP ranks (the norm after it sums it), and
        whether it was sent (RowParallelLinear.part)."""
        q, k, v = self.qkv_proj(x, lora).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope.in_kv_write(q, attn):  # the backend rotates q and k in its KV write
            out = attn(self.layer_idx, q, k, v, positions, rope.cos_sin)
        else:
            q, k = rope(positions, q, k)
            out = attn(self.layer_idx, q, k, v)  # writes k, v into this layer's pages, returns [T, H, D]
        return self.o_proj.part(out.reshape(-1, self.q_size), lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, cfg.intermediate_size, tp)  # silu(gate) * up
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp)

    def forward(self, x, lora=None) -> tuple[torch.Tensor, bool]:
        """This rank's part of the output, and whether it was sent, as Attention's."""
        return self.down_proj.part(self.gate_up_proj(x, lora), lora)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: Group):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)
        self.tp = tp

    def forward(self, positions, x, residual, rope, attn, lora=None, whole=False, sent=False):
        """x: the layer before's output as this rank's part of the sum over the TP ranks (`sent`: its GEMV sent it
        already), or `whole` (the stage before's); with no residual, the embedding's (of one rank: with several,
        rank 0 passes its lookup and the others zeros, with a zero residual). Returns this layer's output as its part,
        the residual, and whether the part was sent: each norm sums the part before it, with the residual add
        (where it can, one kernel: RMSNorm, which receives the parts that row-parallel GEMVs send:
        RowParallelLinear.part)."""
        if residual is None:  # the embedding's output, whole
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual, SINGLE if whole else self.tp, sent)
        x, sent = self.self_attn(positions, x, rope, attn, lora)
        x, residual = self.post_attention_layernorm(x, residual, self.tp, sent)
        x, sent = self.mlp(x, lora)
        return x, residual, sent


class LlamaModel(nn.Module):
    """`forward` returns final hidden states [T, hidden]; `compute_logits` maps the sampled rows to the vocab.
    Pipeline stages: the first embeds, the last normalises and holds the LM head; a stage other than the last
    returns (hidden, residual) for the next, which passes them in as `intermediate`."""

    def __init__(self, cfg: ModelConfig, shard: Shard = Shard(), tp: Group = SINGLE):
        super().__init__()
        self.cfg, self.shard, self.tp = cfg, shard, tp
        self.layer_range = shard.layers(cfg.num_layers)
        tied_head = cfg.tie_word_embeddings and shard.last_stage  # the embedding's table is also the LM head
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, embeds=True, head=tied_head)
                             if shard.first_stage else None)  # fmt: skip
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(len(self.layer_range)))
        if not shard.last_stage and self.layers:  # the stage's last part is summed by an all-reduce, not a norm
            self.layers[-1].mlp.down_proj.feeds_norm = False
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.norm = self.lm_head = None
        if shard.last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            if not cfg.tie_word_embeddings or not shard.first_stage:  # tied: the last stage loads a copy
                self.lm_head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, intermediate=None, lora=None):
        """attn(layer_idx, q, k, v) -> [T, H, D]: the step's attention backend, already planned, or its bound `op`
        (in the one- and two-row decode graphs, for a backend that rotates in its KV write, attn(layer_idx, q, k, v,
        positions, cos_sin) with q and k unrotated: RotaryEmbedding.in_kv_write). lora [T]: each token's adapter
        slot (-1: none), or None when no token has one (lora.py)."""
        whole = intermediate is not None  # the stage before's output: x whole, beside its residual
        if whole:
            x, residual = intermediate
        else:  # with several ranks, rank 0's lookup and the others' zeros, summed by the first norm (all-reduce fused)
            x = self.embed_tokens.part(input_ids)
            residual = torch.zeros_like(x) if self.tp.size > 1 else None
        sent = False  # whether x, a layer's output part, was sent by its down projection's GEMV
        for i, layer in enumerate(self.layers):
            x, residual, sent = layer(positions, x, residual, self.rope, attn, lora, whole=whole and i == 0,
                                      sent=sent)  # fmt: skip
        if self.norm is None:  # the next stage's first layer takes x whole (its last part never sent: feeds_norm)
            return (self.tp.all_reduce(x) if self.tp.size > 1 else x), residual
        x, _ = self.norm(x, residual, self.tp, sent)
        return x

    @property
    def head(self) -> VocabParallelEmbedding | None:
        """The LM head: its own, or the tied embedding; None on a stage other than the last."""
        return (self.lm_head or self.embed_tokens) if self.norm is not None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)
