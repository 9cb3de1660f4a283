"""The model's layers that tensor parallelism, quantisation and LoRA share: linear layers of a few explicit kinds,
the vocab-parallel embedding / LM head, RMSNorm and RoPE, and the one place that decides how a layer multiplies.

Linear kinds, for a layer sharded over `tp` ranks (tp = 1: each is a plain linear layer):
- `ReplicatedLinear`: every rank holds the whole weight.
- `ColumnParallelLinear`: each rank holds a slice of the output features; no communication.
- `RowParallelLinear`: each rank holds a slice of the input features and sums the partial outputs (all-reduce);
  in a decoder layer it returns its part (`part`) and the RMSNorm after it sums the parts, on CUDA through
  the group's symmetric buffer, for small steps in one kernel with the residual add (`RMSNorm.forward`'s `tp`).
- `QKVLinear`: q, k and v stacked, column-parallel by heads; KV heads are replicated when fewer than the ranks.
- `GateUpLinear`: gate and up stacked, column-parallel, returning silu(gate) * up.
Each parameter carries a `weight_loader(param, tensor, shard_id=None)` that copies its own shard out of a full
checkpoint tensor (HF name; shard_id "q"/"k"/"v" or 0/1 for the stacked halves), so the loader never slices.
Every parameter of a linear layer is [out features, ...]: dim 0 is sliced by output feature, dim 1 (input
features, or groups or packs of them) by equal parts per rank, or copied whole where it has one column (a
quantised layer's per-channel scales), so quantised layers (quant.py) shard through the same loaders.

A linear layer of a decoder layer may also hold LoRA adapters (`lora_a`, `lora_b`: slot buffers that lora.py
attaches); `forward(x, lora)` then adds each token's adapter delta (`lora` [T]: its slot, -1 none) to the base
output, before gate/up's activation and before a row-parallel layer's all-reduce (`multiply`; in the one- and
two-row decode graphs inside the GEMV).

How a layer multiplies is `ReplicatedLinear.multiply`: `matmul` / `gated_matmul` below (a dense matmul, or the
Triton GEMV of small_batch.py in the one- and two-row decode graphs), or, for a quantised layer, its `quant`
method (quant.py: FP8 or 4-bit weights and their kernels). small_batch's switch is read here only, never in
model.py.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from nanokyro import quant, small_batch
from nanokyro.lora import lora_delta, lora_shrink
from nanokyro.parallel import SINGLE, Group


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x @ weight.T (+ bias): the Triton GEMV in one- and two-row decode graphs, oneDNN for a weight that
    `pack_for_cpu` packed, fbgemm for an int8 one (quant.int8_pack: a CPU draft's LM head), the FP8 layers' op for
    an fp8 one with its per-row `scale` (quant.fp8_head: the LM head), else F.linear."""
    if scale is not None:
        return torch.ops.nanokyro.fp8_linear(x, weight, scale, bias, False, True)
    if isinstance(weight, torch.ScriptObject):
        return quant.int8_linear(x, weight, bias)
    if weight.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])
    return small_batch.linear(x, weight, bias)


def gated_matmul(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for the stacked weight gate_up [2N, K]; one kernel in the small graphs."""
    if small_batch.on(x):
        return small_batch.silu_and_mul_linear(x, gate_up)
    return small_batch.silu_and_mul(matmul(x, gate_up))


@torch.no_grad()
def pack_for_cpu(model, rows: int = 1) -> None:
    """On the CPU, the fp32 weights of the dense linear layers and of the LM head in oneDNN's own blocked layout,
    chosen for products of `rows` rows: MKL's sgemm behind F.linear is compute-bound at a few rows here, so a
    decode step (one row per sequence) and a speculative verify step (k + 1 rows) run 1.7-3x faster through oneDNN,
    and a layout blocked for k + 1 rows makes the verify 1.5x faster again (docs/PERFORMANCE.md). The linear
    layers' weights are replaced; the LM head gets a packed copy (`head_weight`), as a tied one still embeds."""
    for m in model.modules():
        if isinstance(m, ReplicatedLinear) and m.quant is None and _packable(m.weight):
            m.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows),
                                    requires_grad=False)  # fmt: skip
    if model.head is not None:  # the last stage
        pack_head(model.head, rows)


def pack_head(head: VocabParallelEmbedding, rows: int = 1) -> None:
    """The LM head's packed copy, for `logits` (the dense weight stays: a tied head also embeds); a head that
    already multiplies a quantised copy (quant.py, made before this at load) keeps it."""
    if head.head_weight is None and _packable(head.weight):
        head.head_weight = torch.ops.mkldnn._reorder_linear_weight(head.head_rows.detach(), rows)


def _packable(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_mkldnn
            and torch.backends.mkldnn.is_available())  # fmt: skip


class ReplicatedLinear(nn.Module):
    """The whole [out, in] weight (and optional [out] bias) on every rank; the base of the sharded kinds."""

    quant = None  # quant.py's method for a quantised layer (it owns the weight's format and matmul); None: dense

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: Group):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, tensor: torch.Tensor, shard_id=None) -> None:
        param.copy_(tensor.narrow(0, 0, param.shape[0]))  # (block-wise FP8 scales have rows past the last)

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
                 lora: torch.Tensor | None = None, send: tuple | None = None) -> torch.Tensor:  # fmt: skip
        """x @ weight.T (+ bias) (+ the LoRA delta of each token's adapter, with `lora`: the tokens' slots);
        `gated`: silu(x @ gate.T) * (x @ up.T) of a stacked [gate; up] weight, the deltas added before silu.
        `send` (RowParallelLinear.part): the GEMV also sends the result to the TP group's other ranks."""
        if lora is not None:
            if self.quant is None and small_batch.on(x):  # the GEMV adds the delta in its epilogue
                s = lora_shrink(x, self.lora_a, lora)
                return small_batch.lora_linear(x, self.weight, bias, gated, s, self.lora_b, lora, send)
            assert send is None, "only the GEMV sends"
            y = lora_delta(self.multiply(x, bias), x, self.lora_a, self.lora_b, lora)
            return small_batch.silu_and_mul(y) if gated else y
        if send is not None:
            assert self.quant is None and small_batch.on(x), "only the GEMV sends"
            return small_batch.linear(x, self.weight, bias, send)
        if self.quant is not None:
            return self.quant.matmul(self, x, bias, gated)
        return gated_matmul(x, self.weight) if gated else matmul(x, self.weight, bias)

    def forward(self, x: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        return self.multiply(x, self.bias, lora=lora)


class ColumnParallelLinear(ReplicatedLinear):
    """Output features split over the ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp) of the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: Group):
        super().__init__(in_features, out_features // tp.size, bias, tp)

    def weight_loader(self, param, tensor, shard_id=None):
        n = param.shape[0]
        param.copy_(tensor.narrow(0, self.tp.rank * n, n))


class RowParallelLinear(ReplicatedLinear):
    """Input features split over the ranks; the partial products are summed over them (the bias added once)."""

    feeds_norm = True  # its `part` goes to an RMSNorm that sums it; the model clears it where an all-reduce does

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: Group):
        super().__init__(in_features // tp.size, out_features, bias, tp)
        self.reduce = tp.size > 1

    def weight_loader(self, param, tensor, shard_id=None):
        if param.dim() == 1:  # the bias is whole on every rank
            return param.copy_(tensor)
        tensor = tensor.narrow(0, 0, param.shape[0])  # (block-wise FP8 scales have rows past the last)
        n = param.shape[1]
        if tensor.shape[1] == n:  # one column on every rank (per-channel scales), or one rank
            return param.copy_(tensor)
        if tensor.shape[1] != n * self.tp.size:
            raise ValueError(f"a checkpoint tensor of shape {tuple(tensor.shape)} does not split into {self.tp.size} "
                             f"equal parts of {n} along its input features (quantisation groups must not straddle "
                             "ranks)")  # fmt: skip
        param.copy_(tensor.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), summed over the ranks."""
        if not self.reduce:
            return self.multiply(x, self.bias, lora=lora)
        y = self.tp.all_reduce(self.multiply(x, lora=lora))
        return y if self.bias is None else y + self.bias

    def part(self, x: torch.Tensor, lora: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """This rank's part of x @ W.T (+ bias, in rank 0's), which RMSNorm then sums with its residual add (its
        `tp`), and whether the GEMV already sent it to the other ranks (the norm's `sent`): in the one- and
        two-row graphs, for a dense layer whose group fuses the all-reduce with the norm, so that the norm's
        kernel only receives (small_batch.all_reduce_rms_norm). With one rank, the whole product."""
        if not self.reduce:
            return self.multiply(x, self.bias, lora=lora), False
        send = (self.feeds_norm and self.quant is None and small_batch.on(x)
                and self.tp.fuses(self.out_features))  # fmt: skip
        bias = self.bias if self.tp.rank == 0 else None
        return self.multiply(x, bias, lora=lora, send=self.tp.fused if send else None), send


class QKVLinear(ReplicatedLinear):
    """q, k, v stacked: this rank's q heads, then its k heads, then its v heads. With fewer KV heads than ranks,
    each KV head is held by tp / num_kv_heads ranks (those whose q heads read it)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: Group):
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.first_kv_head = tp.rank * num_kv_heads // tp.size
        self.head_dim = head_dim
        super().__init__(hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias, tp)

    def weight_loader(self, param, tensor, shard_id=None):
        d, q, kv = self.head_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            dst, src = param.narrow(0, 0, q), tensor.narrow(0, self.tp.rank * q, q)
        else:
            dst = param.narrow(0, q if shard_id == "k" else q + kv, kv)
            src = tensor.narrow(0, self.first_kv_head * d, kv)
        dst.copy_(src)


class GateUpLinear(ColumnParallelLinear):
    """gate and up stacked [gate shard; up shard], column-parallel; forward returns silu(gate) * up."""

    def __init__(self, hidden: int, intermediate: int, tp: Group):
        super().__init__(hidden, 2 * intermediate, False, tp)

    def weight_loader(self, param, tensor, shard_id=None):
        n = param.shape[0] // 2
        param.narrow(0, shard_id * n, n).copy_(tensor.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        return self.multiply(x, gated=True, lora=lora)


class VocabParallelEmbedding(nn.Module):
    """The embedding (`embeds`), and as `logits` the LM head (tied or not). The head: vocab rows split over the
    ranks, padded up to a multiple of them; each rank multiplies its slice, gathered. The lookup: TP rank 0 holds
    the whole table and looks every id up, the other ranks add zeros (`part`, summed by the first layer's norm).
    So no rank but 0 reads the ids, and the tokens rank 0 samples stay there: a step's input ids that are still
    the step before's placeholders need no broadcast."""

    def __init__(self, vocab_size: int, hidden: int, tp: Group, embeds: bool = False, head: bool = True):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.rows = math.ceil(vocab_size / tp.size)  # the head's rows on each rank
        self.start = tp.rank * self.rows
        # The vocab rows held from `first` on: every one on the rank that looks up, else this rank's head slice
        # (none on a rank that only embeds). Every rank's KV cache is sized to the fullest rank's room, so the
        # whole table costs each (tp - 1) / tp of it: 0.5 GB at 8B TP=2, about 1.8 GB at 70B TP=8.
        self.whole = embeds and tp.rank == 0
        self.first, held = (0, vocab_size) if self.whole else (self.start, self.rows if head else 0)
        self.weight = nn.Parameter(torch.empty(held, hidden))
        self.weight.weight_loader = self.weight_loader
        # the weight as the LM head multiplies it (pack_for_cpu; int8: quant.int8_head; fp8 with its per-row
        # scales [rows, 1]: quant.fp8_head)
        self.head_weight: torch.Tensor | torch.ScriptObject | None = None
        self.head_scale: torch.Tensor | None = None

    def weight_loader(self, param, tensor, shard_id=None):
        n = max(0, min(param.shape[0], self.vocab_size - self.first))  # the last ranks' slices run past the vocab
        param[n:].zero_()
        if n:
            param[:n].copy_(tensor.narrow(0, self.first, n))

    @property
    def head_rows(self) -> torch.Tensor:
        """The rows of `weight` that the LM head multiplies: this rank's slice of the vocab (the first rows held,
        on the rank that holds the whole table too: it is rank 0)."""
        return self.weight[: self.rows]

    def part(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the lookup: each id's row on the rank that holds the whole table, zeros on the
        others (summed over the ranks, the embedding)."""
        if self.whole:
            return F.embedding(ids, self.weight)
        return self.weight.new_zeros(*ids.shape, self.weight.shape[1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, H] -> logits [R, vocab_size] on every rank."""
        weight = self.head_rows if self.head_weight is None else self.head_weight
        logits = matmul(hidden, weight, scale=self.head_scale)
        return logits if self.tp.size == 1 else self.tp.all_gather(logits)[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, tp: Group = SINGLE, sent: bool = False):
        """Normalise x; with `residual`, first add it and also return the sum as the next residual. With a `tp`
        group of several ranks, x is this rank's part of a row-parallel layer's output: summed over the ranks first,
        in one kernel with the residual add and the norm where the group can (Group.all_reduce_rms_norm; `sent`:
        that layer's GEMV sent the part, RowParallelLinear.part)."""
        if tp.size > 1:
            fused = tp.all_reduce_rms_norm(x, residual, self.weight, self.eps, sent) if residual is not None else None
            if fused is not None:
                return fused
            x = tp.all_reduce(x)
        if small_batch.on(x) and x.dim() == 2:  # one Triton kernel in one- and two-row decode graphs
            return small_batch.rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xf.to(x.dtype) * self.weight
        return out if residual is None else (out, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind is None:
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves) from a cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), rope_inv_freq(head_dim, theta, scaling))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1).float(), persistent=False)

    def in_kv_write(self, q: torch.Tensor, attn) -> bool:
        """Whether `attn` rotates q and k itself, in the kernel that writes k and v (given the positions and
        `cos_sin`), instead of this module before it: in the one- and two-row decode graphs, where a launch costs
        more than its work (one fewer a layer, and no round trip of k), and for a backend whose
        `rotates_in_kv_write` says it does (FlashInfer's: attention.triton_rope_write_kv; not the torch one).
        `attn`: a backend, or the bound `op` of one, as the compiled graphs pass it."""
        backend = attn.__self__ if isinstance(attn, types.MethodType) else attn
        return backend.rotates_in_kv_write and small_batch.on(q)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotated q [T, H, D] and k [T, Hkv, D]."""
        return rope(self.cos_sin, positions, q, k)


def rope(cos_sin: torch.Tensor, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """q [T, H, D] and k [T, Hkv, D] rotated by their tokens' rows of cos_sin [max_positions, D] (cos, then sin),
    in fp32, rounded to their dtype."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
