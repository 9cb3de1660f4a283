"""FP8, 4-bit (AWQ) and CPU int8 quantised linear layers: what a layer holds, how it multiplies, and which kernel
takes how many rows. The checkpoint formats, their conversion and the packed layouts are quant_formats.py's; the
Triton kernels are quant_triton.py's.

What a quantised layer holds, every tensor [out features, ...] so that tensor parallelism slices dim 0 for
output features and dim 1 for input features (or groups of them) exactly as for a dense weight (layers.py):
- FP8: `weight` fp8 [N, K] and `weight_scale` fp32 [N, K / gk] (gk = 128 for block-wise checkpoints; one column,
  the same on every rank, for per-channel scales).
- int4: `qweight` int32 [N, K/8] (input feature 8j + i in bits 4i..4i+3), `scales` and `zeros` [N, K/g] in the
  model's dtype; w = (q - zero) * scale. On CUDA, after loading, where the layer's shape allows it: `qweight` in
  the MMA fragment layout (int32 [N/16, K/64, 32, 4], quant_formats.py) and `mma_scales_zeros` [K/g, N] instead.
- int8 (the CPU only; a speculative draft's, `speculative_draft_quantization="int8"`): `int8_weight`, fbgemm's
  packed weight (torch.ops.quantized.linear_prepack) of symmetric int8 with one scale per output feature, in
  place of `weight`. The LM head gets one too (`head_weight`): it is over a quarter of a small model's bytes.
- the LM head in FP8 (`quantize_lm_head`, beside FP8 layers): `head_weight` fp8 [vocab rows, H] and `head_scale`
  fp32 [vocab rows, 1], one scale per row as `quantization="fp8"` gives a layer's output features.

How they multiply (`Fp8Method.matmul`, `Int4Method.matmul`, one custom op each so compiled graphs stay whole; an
FP8 LM head through the FP8 layers' op, from layers.matmul):
- on CUDA, FP8: one Triton kernel (`qgemv`) that reads the packed weight once and dequantises it in registers,
  the activations staying in the model's dtype: a GEMV for one or two rows (decode is bound by reading the
  weights), tensor-core tiles above. With per-channel scales it runs for GEMV_MAX_ROWS rows (one); from there
  the activations are quantised per token (dynamic scales) and `torch._scaled_mm` multiplies (W8A8;
  W8A8_TENSORWISE_MAX_ROWS). Block-wise scales keep the Triton kernel at every size.
- on CUDA, int4 in the MMA layout: quant_cuda.py's GEMV (tensor-core MMAs on weights unpacked in registers) up
  to MMA_GEMV_MAX_ROWS rows, its GEMM (x staged in shared memory; on sm_90 the warpgroup MMA's, up to
  WGMMA_MAX_ROWS, elsewhere mma.sync's, up to MMA_GEMM_MAX_ROWS), the weight dequantised (quant_cuda.py) + cuBLAS
  above; in the rows layout the Triton kernel, dequantise + cuBLAS from INT4_DEQUANT_ROWS. Settings and switch
  points come from the sweep in docs/PERFORMANCE.md.
- on the CPU: per-channel FP8 runs the same W8A8 `_scaled_mm`; block-wise FP8 and int4 dequantise the weight
  and run the dense matmul. int8: fbgemm's dynamic W8A8 (`linear_dynamic`): the activations quantised at run time,
  one scale over the rows (per token at batch 1), products summed in int32. A decode step on the CPU is bound by
  reading the weights, which int8 makes 4x fewer bytes than fp32 (docs/PERFORMANCE.md). torch has deprecated
  quantised tensors (the prepack's input); the kernel itself is fbgemm's.
"""
from __future__ import annotations

import functools
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanokyro import quant_cuda
from nanokyro.quant_cuda import (MAX_ROWS as MMA_GEMV_MAX_ROWS, w4_dequantise, w4_gemm, w4_gemv, w4_wgmma,
                                 wgmma_available)  # fmt: skip
from nanokyro.quant_formats import (FP8, QuantConfig, dequantise_fp8, dequantise_int4, mma_layout_applies, mma_pack,
                                    mma_scales_zeros, pack_rows, quantise_rows_fp8, unpack_rows)  # fmt: skip
from nanokyro.quant_triton import dequantise_int4_cuda, qgemv, quantise_rows_fp8_cuda, scale_outer_cuda
from nanokyro.small_batch import silu_and_mul

# FP8 per-channel: the Triton GEMV up to here (63.6 us a llama-3.1-8b layer at one row), W8A8 above (at 2-16 rows
# 79-82 us, the Triton tiles 91-92; a decode step at batch 8 4.31 ms against 4.58: session 16 in docs/PERFORMANCE.md)
GEMV_MAX_ROWS = 1
# FP8 per-channel W8A8 above GEMV_MAX_ROWS, up to this many rows (decode batches): cuBLASLt's fp8 GEMM with unit
# scales into fp32, the per-token and per-channel scales applied after it in one Triton kernel ("tensorwise": 84-111
# us a llama-3.1-8b layer at 17-128 rows, against 121-131 for `_scaled_mm` with both scales, torch's CUTLASS rowwise
# kernel, and 124-149 for bf16 cuBLAS; session 15's sweep in docs/PERFORMANCE.md). Above it (prefill chunks) the
# rowwise kernel: the fp32 product costs twice the output's bytes (0.9 GB for gate/up at 8192 tokens), and at 256
# rows the two are already even.
W8A8_TENSORWISE_MAX_ROWS = 256
INT4_DEQUANT_ROWS = 512  # int4 in the rows layout on CUDA: the Triton kernel below this, dequantise + cuBLAS from here
# int4 in the MMA layout above MMA_GEMV_MAX_ROWS: on sm_90 quant_cuda's warpgroup-MMA GEMM up to WGMMA_MAX_ROWS
# (session 26's sweep, llama-3.1-8b's layer: 103 us at 33 rows against 132 for the mma.sync GEMM and 125 for bf16
# cuBLAS, 419 at 384 against 441 for dequantise + cuBLAS, 506 at 512 against 499); elsewhere its mma.sync GEMM up to
# MMA_GEMM_MAX_ROWS (session 25's: 245 us at 128 rows against 316, 378 at 192 against 352); dequantise + cuBLAS above
WGMMA_MAX_ROWS = 384
MMA_GEMM_MAX_ROWS = 160


# -- the methods: what a quantised layer holds and how it multiplies ------------------------------------------


def _param(layer: nn.Module, name: str, shape, dtype, device) -> None:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = layer.weight_loader
    setattr(layer, name, p)


class Fp8Method:
    """FP8 weights: `weight` fp8 [N, K], `weight_scale` fp32 [N, K / block] or [N, 1]."""

    def __init__(self, qcfg: QuantConfig):
        self.block = qcfg.group_size if qcfg.fmt == "fp8-block" else 0

    def create(self, layer: nn.Module) -> None:
        (n, k), device = layer.weight.shape, layer.weight.device
        del layer.weight
        _param(layer, "weight", (n, k), FP8, device)
        _param(layer, "weight_scale", (n, -(-k // self.block) if self.block else 1), torch.float32, device)

    def quantise(self, layer: nn.Module) -> None:
        """Full-precision `weight` -> fp8 with one scale per output feature (max |w| maps to FP8's max). Under
        tensor parallelism each rank scales its own shard: a row-parallel layer's scales come from its slice of
        the input features, so ranks > 1 round slightly differently from one rank."""
        w, scale = quantise_rows_fp8(layer.weight.data)
        del layer.weight
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False):
        return torch.ops.nanokyro.fp8_linear(x, layer.weight, layer.weight_scale, bias, gated, not self.block)


class Int4Method:
    """4-bit weights: `qweight` int32 [N, K/8], `scales` and `zeros` [N, K/g]; w = (q - zero) * scale."""

    def __init__(self, qcfg: QuantConfig):
        self.group = qcfg.group_size

    def create(self, layer: nn.Module) -> None:
        (n, k), dtype, device = layer.weight.shape, layer.weight.dtype, layer.weight.device
        if k % self.group:
            raise ValueError(f"4-bit weights need input features ({k}) in whole groups of {self.group}")
        del layer.weight
        _param(layer, "qweight", (n, k // 8), torch.int32, device)
        _param(layer, "scales", (n, k // self.group), dtype, device)
        _param(layer, "zeros", (n, k // self.group), dtype, device)

    def quantise(self, layer: nn.Module) -> None:
        """Round to nearest, asymmetric: each group's [min, max] onto 0..15."""
        w = layer.weight.data
        n, k = w.shape
        if k % self.group:
            raise ValueError(f"4-bit weights need input features ({k}) in whole groups of {self.group}")
        g = w.float().reshape(n, k // self.group, self.group)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 15)
        q = (g / scale[..., None] + zero[..., None]).round().clamp(0, 15).reshape(n, k)
        del layer.weight
        layer.qweight = nn.Parameter(pack_rows(q), requires_grad=False)
        layer.scales = nn.Parameter(scale.to(w.dtype), requires_grad=False)
        layer.zeros = nn.Parameter(zero.to(w.dtype), requires_grad=False)

    def repack(self, layer: nn.Module) -> None:
        """On CUDA (sm_80+: bf16 MMAs), after loading: the weight into the MMA layout of quant_cuda.py's kernels
        where it applies (quant_formats.mma_layout_applies: bf16 or fp16, whole strips of 16 outputs and blocks of
        64 features, whole zeros) and the kernels build (quant_cuda.available), `mma_scales_zeros` [K/g, N]
        replacing `scales` and `zeros`; other layers keep the rows layout of the Triton kernels."""
        from nanokyro.layers import GateUpLinear

        n, k, device = layer.qweight.shape[0], layer.qweight.shape[1] * 8, layer.qweight.device
        gated, dtype = isinstance(layer, GateUpLinear), layer.scales.dtype
        on_cuda = layer.qweight.is_cuda and torch.version.cuda is not None  # (not ROCm)
        if not (on_cuda and torch.cuda.get_device_capability(device) >= (8, 0)
                and mma_layout_applies(n, k, self.group, dtype, layer.zeros, gated)
                and quant_cuda.available(device, dtype, self.group)):  # fmt: skip
            return
        packed = mma_pack(unpack_rows(layer.qweight))
        scales_zeros = mma_scales_zeros(layer.scales, layer.zeros)
        del layer.qweight, layer.scales, layer.zeros
        layer.qweight = nn.Parameter(packed, requires_grad=False)
        layer.mma_scales_zeros = nn.Parameter(scales_zeros, requires_grad=False)

    def matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False):
        if hasattr(layer, "mma_scales_zeros"):
            return torch.ops.nanokyro.int4_mma_linear(x, layer.qweight, layer.mma_scales_zeros, self.group, bias,
                                                      gated)  # fmt: skip
        return torch.ops.nanokyro.int4_linear(x, layer.qweight, layer.scales, layer.zeros, bias, gated)


class Int8Method:
    """int8 weights on the CPU: `int8_weight`, fbgemm's packed weight (per-output-channel scales), for `weight`."""

    def __init__(self, qcfg: QuantConfig):
        pass

    def quantise(self, layer: nn.Module) -> None:
        layer.int8_weight = int8_pack(layer.weight.data)
        del layer.weight

    def matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False):
        return _gate(int8_linear(x, layer.int8_weight, bias), gated)


def make_method(qcfg: QuantConfig):
    return {"fp8": Fp8Method, "awq": Int4Method, "int8": Int8Method}[qcfg.method](qcfg)


def linear_layers(model: nn.Module, qcfg: QuantConfig):
    """The model's linear layers that the config quantises (a fused layer: all of its HF modules or none)."""
    from nanokyro.layers import GateUpLinear, QKVLinear, ReplicatedLinear

    first = model.layer_range.start
    for name, module in model.named_modules():
        if not isinstance(module, ReplicatedLinear):
            continue
        # HF names count layers over the whole model, a pipeline stage from its first
        prefix = re.sub(r"^layers\.(\d+)", lambda m: f"layers.{int(m[1]) + first}", name.rpartition(".")[0])
        if isinstance(module, QKVLinear):
            parts = ("q_proj", "k_proj", "v_proj")
        else:
            parts = ("gate_proj", "up_proj") if isinstance(module, GateUpLinear) else (name.rpartition(".")[2],)
        hf = [f"model.{prefix}.{p}" for p in parts]
        kept = [qcfg.quantises(h) for h in hf]
        if any(kept) != all(kept):
            raise ValueError(f"{hf} are fused into one layer: quantise all of them or none")
        if all(kept):
            yield module


def prepare(model: nn.Module, qcfg: QuantConfig | None) -> None:
    """Before loading: a pre-quantised checkpoint's layers get its parameters (full-precision ones keep theirs
    until `finish`)."""
    if qcfg is None:
        return
    for layer in linear_layers(model, qcfg):
        layer.quant = make_method(qcfg)
        if qcfg.fmt != "online":
            layer.quant.create(layer)


@torch.no_grad()
def finish(model: nn.Module, qcfg: QuantConfig | None) -> None:
    """After loading: quantise full-precision weights (`quantization=...` on a dense checkpoint); on CUDA, int4
    weights into the MMA layout where it applies."""
    if qcfg is None:
        return
    for layer in linear_layers(model, qcfg):
        if qcfg.fmt == "online":
            layer.quant.quantise(layer)
        if isinstance(layer.quant, Int4Method):
            layer.quant.repack(layer)
    if qcfg.method == "int8" and model.head is not None:
        int8_head(model.head)
    if qcfg.lm_head and model.head is not None:  # on the last pipeline stage
        fp8_head(model)
    if torch.cuda.is_available():  # the full-precision weights' memory back, for the KV cache to measure
        torch.cuda.empty_cache()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def int8_head(head: nn.Module) -> None:
    """The LM head's int8 copy (`head_weight`, which layers.matmul multiplies); the fp32 weight stays, as a tied
    head also embeds."""
    head.head_weight = int8_pack(head.weight.data)


def fp8_head(model: nn.Module) -> None:
    """The LM head's FP8 copy (`head_weight` and its per-row `head_scale`, which layers.matmul multiplies through the
    FP8 layers' op), rounded as Fp8Method.quantise rounds a layer. It is made from this rank's vocab rows, so under
    tensor parallelism the scales split with them. Parameters, so that the weights' bytes (`weight_bytes`, the
    benchmarks' model_costs) count them. A tied head keeps its full-precision table, which also embeds; an untied
    one's is freed."""
    head = model.head
    w, scale = quantise_rows_fp8(head.weight.data)
    head.head_weight = nn.Parameter(w, requires_grad=False)
    head.head_scale = nn.Parameter(scale, requires_grad=False)
    if head is not model.embed_tokens:
        head.weight = None


def int8_pack(w: torch.Tensor) -> torch.ScriptObject:
    """w [N, K] -> fbgemm's packed int8 weight: round to nearest, one symmetric scale per output feature."""
    if w.device.type != "cpu":
        raise ValueError("int8 weights run on the CPU only (fbgemm's kernels)")
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    with warnings.catch_warnings():  # torch's deprecation of quantised tensors, the prepack's input format
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def int8_linear(x: torch.Tensor, packed: torch.ScriptObject, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ w.T (+ bias) for an int8 weight from `int8_pack`, x quantised to int8 on the fly (one scale
    over its rows). reduce_range: 7-bit activations, as AVX2 without VNNI sums pairs of u8 x s8 products in int16,
    which full-range ones could saturate."""
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), packed, True)
    y = y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias


# -- the ops: dispatch by row count ---------------------------------------------------------------------------


def _gate(y: torch.Tensor, gated: bool) -> torch.Tensor:
    return silu_and_mul(y) if gated else y


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    """A scale of 1 for `_scaled_mm`, made once per device (not a fill kernel per call inside a CUDA graph)."""
    return torch.ones((), dtype=torch.float32, device=device)


def _scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   scaling: str | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ (weight * scale).T with x quantised per token: `torch._scaled_mm`, the scales applied by it
    (rowwise) or after it (tensorwise; `scaling`, by default by W8A8_TENSORWISE_MAX_ROWS), K and N padded to
    multiples of 16 where they are not (CUDA needs it)."""
    n, k = weight.shape
    scaling = scaling or ("tensorwise" if x.shape[0] <= W8A8_TENSORWISE_MAX_ROWS else "rowwise")
    xq, xs = quantise_rows_fp8_cuda(x) if x.is_cuda else quantise_rows_fp8(x)
    pk, pn = -k % 16, -n % 16
    if pk or pn:
        xq, weight, scale = F.pad(xq, (0, pk)), F.pad(weight, (0, pk, 0, pn)), F.pad(scale, (0, 0, 0, pn), value=1.0)
    if scaling == "tensorwise":
        one = _unit_scale(x.device)
        acc = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = scale_outer_cuda(acc, xs, scale, x.dtype) if x.is_cuda else (acc * xs * scale.t()).to(x.dtype)
    else:
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=x.dtype)
    return y[:, :n] if pn else y


@torch.library.custom_op("nanokyro::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               gated: bool, w8a8: bool) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for fp8 w [N, K] with scales [N, K / gk]; `gated`: w stacks gate and up and the
    result is silu(x @ gate.T) * (x @ up.T). `w8a8` (per-channel scales [N, 1]): above GEMV_MAX_ROWS rows
    activations are quantised per token too."""
    if x.is_cuda and (x.shape[0] <= GEMV_MAX_ROWS or not w8a8):
        return qgemv(x, weight, scale, None, bias, gated)
    if w8a8:
        y = _scaled_mm_fp8(x, weight, scale)
    else:  # block-wise scales on the CPU: _scaled_mm's rowwise scaling cannot hold them
        y = F.linear(x, dequantise_fp8(weight, scale).to(x.dtype))
    return _gate(y if bias is None else y + bias, gated)


@fp8_linear.register_fake
def _(x, weight, scale, bias, gated, w8a8):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])


@torch.library.custom_op("nanokyro::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, gated: bool) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for 4-bit w (qweight [N, K/8], scales and zeros [N, K/g])."""
    if x.is_cuda and x.shape[0] < INT4_DEQUANT_ROWS:
        return qgemv(x, qweight, scales, zeros, bias, gated)
    if x.is_cuda:
        y = F.linear(x, dequantise_int4_cuda(qweight, scales, zeros, x.dtype), bias)
    else:
        y = F.linear(x, dequantise_int4(qweight, scales, zeros).to(x.dtype), bias)
    return _gate(y, gated)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, bias, gated):
    return x.new_empty(x.shape[0], qweight.shape[0] // 2 if gated else qweight.shape[0])


@torch.library.custom_op("nanokyro::int4_mma_linear", mutates_args=())
def int4_mma_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                    bias: torch.Tensor | None, gated: bool) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for 4-bit w in the MMA layout (Int4Method.repack): quant_cuda's GEMV up to
    MMA_GEMV_MAX_ROWS rows, its warpgroup-MMA GEMM up to WGMMA_MAX_ROWS on sm_90 (its mma.sync GEMM up to
    MMA_GEMM_MAX_ROWS elsewhere), above that the weight dequantised to x's dtype and cuBLAS."""
    if x.shape[0] <= MMA_GEMV_MAX_ROWS:
        return w4_gemv(x, packed, scales_zeros, group, bias, gated)
    if x.shape[0] <= WGMMA_MAX_ROWS and wgmma_available(x.device):
        return _gate(w4_wgmma(x, packed, scales_zeros, group, bias), gated)
    if x.shape[0] <= MMA_GEMM_MAX_ROWS:
        return _gate(w4_gemm(x, packed, scales_zeros, group, bias), gated)
    return _gate(F.linear(x, w4_dequantise(packed, scales_zeros, group, x.dtype), bias), gated)


@int4_mma_linear.register_fake
def _(x, packed, scales_zeros, group, bias, gated):
    n = packed.shape[0] * 16
    return x.new_empty(x.shape[0], n // 2 if gated else n)
