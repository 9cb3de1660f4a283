"""FP8 and 4-bit (AWQ) weights: the checkpoint formats, the layouts the linear layers hold, and their matmuls.

Formats read (detected from config.json's `quantization_config`), and what each becomes in a layer:
- HF `quant_method: "fp8"` with `weight_block_size` [128, 128] (Qwen3-FP8, DeepSeek): `weight` float8_e4m3fn
  [out, in] and `weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)], w = weight * scale of its block.
- compressed-tensors `float-quantized` FP8 (FP8_DYNAMIC): `weight` fp8 [out, in], `weight_scale` [out, 1].
- `quantization="fp8"` on a checkpoint of full-precision weights: per-output-channel scales computed at load.
- AutoAWQ GEMM (`quant_method: "awq"`, version gemm): `qweight` int32 [in, out/8] (8 output features per int32 in
  AWQ's nibble order 0 2 4 6 1 3 5 7), `qzeros` int32 [in/g, out/8] in the same order, `scales` [in/g, out];
  w = (q - zero) * scale over groups of g input features.
- compressed-tensors `pack-quantized` W4A16 (symmetric): `weight_packed` int32 [out, in/8] (input feature 8j + i
  in bits 4i..4i+3, stored as value + 8), `weight_scale` [out, in/g]; w = (q - 8) * scale.
- `quantization="awq"` on full-precision weights: round-to-nearest 4 bits, groups of 128, with zero points, in
  the same layout (no activation-aware search: for benchmarks and dummy weights, not for quality).

What a quantised layer holds, every tensor [out features, ...] so that tensor parallelism slices dim 0 for
output features and dim 1 for input features (or groups of them) exactly as for a dense weight (layers.py):
- FP8: `weight` fp8 [N, K] and `weight_scale` fp32 [N, K / gk] (gk = 128 for block-wise checkpoints; one column,
  the same on every rank, for per-channel scales).
- int4: `qweight` int32 [N, K/8] (input feature 8j + i in bits 4i..4i+3), `scales` and `zeros` [N, K/g] in the
  model's dtype; w = (q - zero) * scale. On CUDA, after loading, where torch's tinygemm kernel can take the layer:
  `qweight` in its tile layout (int32 [N/8, K/(16 inner), 32, inner/2]) and `scales_zeros` [K/g, N, 2] instead.

How they multiply (`Fp8Method.matmul`, `Int4Method.matmul`, one custom op each so compiled graphs stay whole):
- on CUDA, FP8: one Triton kernel (`_gemv`) that reads the packed weight once and dequantises it in registers,
  the activations staying in the model's dtype: a GEMV for one or two rows (decode is bound by reading the
  weights), tensor-core tiles above. With per-channel scales it runs up to GEMV_MAX_ROWS rows; from there the
  activations are quantised per token (dynamic scales) and `torch._scaled_mm` rowwise multiplies (W8A8).
- on CUDA, int4 in the tinygemm layout: `torch._weight_int4pack_mm` up to TINYGEMM_MAX_ROWS rows, the weight
  dequantised (one Triton kernel) + cuBLAS above; in the other layout the Triton kernel, dequantise + cuBLAS
  from INT4_DEQUANT_ROWS. Settings and switch points come from the sweep in docs/PERFORMANCE.md.
- on the CPU: per-channel FP8 runs the same W8A8 `_scaled_mm`; block-wise FP8 and int4 dequantise the weight
  and run the dense matmul.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's nibble i holds output feature AWQ_ORDER[i] of its 8
GEMV_MAX_ROWS = 16  # FP8 per-channel: the Triton kernel up to here, _scaled_mm above (docs/PERFORMANCE.md's sweep)
INT4_DEQUANT_ROWS = 512  # int4 on CUDA: the Triton kernel below this, dequantise + cuBLAS from here
# int4 in torch's tinygemm layout: `_weight_int4pack_mm` up to here, dequantise + cuBLAS above (the sweep in
# docs/PERFORMANCE.md: tinygemm's time grows with the rows, 1.5x the dequantise path's at 32)
TINYGEMM_MAX_ROWS = 16
TINYGEMM_GROUPS = (32, 64, 128, 256)
METHODS = ("fp8", "awq")


@dataclass(frozen=True)
class QuantConfig:
    """What the checkpoint holds (`fmt`) and what the layers become (`method`: "fp8" or "awq" = int4)."""

    method: str
    fmt: str  # "online" | "fp8-block" | "ct-fp8" | "awq-gemm" | "ct-w4a16"
    group_size: int = 128  # int4: input features per scale; fp8-block: the block's side
    ignore: tuple[str, ...] = field(default_factory=tuple)  # HF module names (or re:patterns) left dense

    def quantises(self, hf_module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], hf_module):
                return False
            if hf_module == pattern or hf_module == f"model.{pattern}" or hf_module.endswith(f".{pattern}"):
                return False
        return True


def quant_config(qc: dict | None, requested: str | None) -> QuantConfig | None:
    """The quantisation of a model: its config.json's `quantization_config` (qc), or `requested` on
    full-precision weights. A checkpoint's own format is used only if it is what was asked for (or nothing was)."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} or None, not {requested!r}")
    if not qc:
        return None if requested is None else QuantConfig(requested, "online")
    found = _checkpoint_format(qc)
    if requested is not None and requested != found.method:
        raise ValueError(f"the checkpoint is already quantised ({found.fmt}); it cannot be served as {requested!r}")
    return found


def _checkpoint_format(qc: dict) -> QuantConfig:
    kind = qc.get("quant_method")
    if kind == "fp8":
        block = qc.get("weight_block_size")
        if block is None or list(block) != [128, 128]:
            raise ValueError(f"FP8 checkpoints need weight_block_size [128, 128], not {block}")
        return QuantConfig("fp8", "fp8-block", 128, tuple(qc.get("modules_to_not_convert") or ()))
    if kind == "awq":
        if qc.get("bits", qc.get("w_bit")) != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"AWQ checkpoints must be 4-bit GEMM ('version': 'gemm'), not {qc}")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported")
        return QuantConfig("awq", "awq-gemm", _group_size(qc.get("group_size", qc.get("q_group_size"))),
                           tuple(qc.get("modules_to_not_convert") or ()))  # fmt: skip
    if kind == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config groups are not supported")
        w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
        ignore = tuple(qc.get("ignore") or ())
        if qc.get("format") == "float-quantized" and w.get("type") == "float" and w.get("num_bits") == 8:
            if w.get("strategy") != "channel" or (a is not None and not a.get("dynamic")):
                raise ValueError("compressed-tensors FP8 must have per-channel weight scales and dynamic activation "
                                 f"scales (FP8_DYNAMIC), not weights {w} activations {a}")  # fmt: skip
            return QuantConfig("fp8", "ct-fp8", 0, ignore)
        if qc.get("format") == "pack-quantized" and w.get("type") == "int" and w.get("num_bits") == 4:
            if not w.get("symmetric", True) or w.get("strategy") != "group" or a is not None:
                raise ValueError(f"compressed-tensors int4 must be symmetric, group-wise, weight-only (W4A16): {w}")
            return QuantConfig("awq", "ct-w4a16", _group_size(w.get("group_size")), ignore)
        raise ValueError(f"unsupported compressed-tensors format {qc.get('format')!r} with weights {w}")
    raise ValueError(f"unsupported quantization_config quant_method {kind!r} (supported: fp8, awq, compressed-tensors)")


def _group_size(g) -> int:
    if g not in (32, 64, 128):
        raise ValueError(f"4-bit group size must be 32, 64 or 128, not {g}")
    return g


# -- checkpoint tensors -> the layers' layout -----------------------------------------------------------------


def checkpoint_tensors(qcfg: QuantConfig | None, tensors):
    """Rename and re-lay a pre-quantised checkpoint's tensors of quantised linear layers into the [out, ...]
    tensors the layers hold (module docstring); every other tensor passes through."""
    for name, t in tensors:
        module, _, suffix = name.rpartition(".")
        if qcfg is None or qcfg.fmt == "online" or not _is_linear(module) or not qcfg.quantises(module):
            yield name, t
            continue
        for new_suffix, tensor in _convert(qcfg, suffix, t):
            yield f"{module}.{new_suffix}", tensor


def _is_linear(module: str) -> bool:
    return module.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _convert(qcfg: QuantConfig, suffix: str, t: torch.Tensor):
    if suffix == "bias":
        yield suffix, t
    elif qcfg.fmt in ("fp8-block", "ct-fp8"):
        if suffix == "weight":
            yield "weight", t.to(FP8)
        elif suffix == "weight_scale_inv":  # one row per output feature: rows past `out` are never read
            yield "weight_scale", t.float().repeat_interleave(qcfg.group_size, 0)
        elif suffix == "weight_scale":
            yield "weight_scale", t.float().reshape(t.shape[0], 1)
        elif suffix != "input_scale":  # dynamic activation scales: a static one, if present, is unused
            raise ValueError(f"unexpected tensor {suffix!r} in an FP8 checkpoint")
    elif qcfg.fmt == "awq-gemm":
        if suffix == "qweight":  # [K, N/8] in AWQ's order -> [N, K/8] in order
            yield "qweight", pack_rows(unpack_awq(t).t())
        elif suffix == "qzeros":
            yield "zeros", unpack_awq(t).t().contiguous()
        elif suffix == "scales":
            yield "scales", t.t().contiguous()
        else:
            raise ValueError(f"unexpected tensor {suffix!r} in an AWQ checkpoint")
    elif qcfg.fmt == "ct-w4a16":
        if suffix == "weight_packed":
            yield "qweight", t.to(torch.int32)
        elif suffix == "weight_scale":
            yield "scales", t
            yield "zeros", torch.full(t.shape, 8, dtype=t.dtype, device=t.device)  # symmetric: stored as q + 8
        elif suffix != "weight_shape":
            raise ValueError(f"unexpected tensor {suffix!r} in a compressed-tensors W4A16 checkpoint")


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 [R, C/8] -> the 4-bit values [R, C] (int32 0..15) in feature order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, C/8, 8]: nibble i holds feature AWQ_ORDER[i]
    order = torch.tensor(AWQ_ORDER, device=packed.device).argsort()
    return nibbles[..., order].reshape(packed.shape[0], -1)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [N, K] (0..15) -> int32 [N, K/8], feature 8j + i in bits 4i..4i+3 of column j."""
    n, k = q.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (q.to(torch.int32).reshape(n, k // 8, 8) << shifts).sum(-1, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


# -- torch's tinygemm int4 layout (`torch._weight_int4pack_mm` on CUDA) ----------------------------------------
#
# `torch.ops.aten._convert_weight_to_int4pack(bytes, inner)` takes uint8 [N, K/2] (feature 2j in the high nibble
# of byte j, 2j + 1 in the low one) and returns int32 [N/8, K/(16 inner), 32, inner/2]: the B operand of the
# m16n8k16 tensor-core MMA, one 16-byte load per lane for inner = 8 (aten/src/ATen/native/cuda/int4mm.cu). Lane t
# of tile (nt, ko) holds row 8 nt + t // 4; its word j, nibble 4 odd + 2 i2 + i1 (bits 4i..), holds feature
# 16 inner ko + 32 j + 16 i2 + 8 i1 + 2 (t % 4) + odd. The kernel dequantises w = (q - 8) * scale + zero.


def tinygemm_inner_k_tiles(n: int, k: int, group: int, dtype: torch.dtype) -> int | None:
    """The k-tiles per lane load (8: 16 bytes; 4 where K is not in whole 128s) for an [n, k] int4 weight in
    groups of `group` with `dtype` scales, or None where the tinygemm kernel cannot take it (it multiplies bf16)."""
    if dtype != torch.bfloat16 or group not in TINYGEMM_GROUPS or n % 8:
        return None
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else None


def tinygemm_bytes(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [N, K] (0..15) -> uint8 [N, K/2], what `_convert_weight_to_int4pack` takes."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def tinygemm_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales and zeros [N, K/g] of w = (q - zero) * scale -> bf16 [K/g, N, 2] for tinygemm's (q - 8) * scale +
    zero: its zero is (8 - zero) * scale."""
    s = scales.float()
    return torch.stack([s, (8 - zeros.float()) * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_pack(q: torch.Tensor, inner: int) -> torch.Tensor:
    """4-bit values [N, K] -> the int32 tile layout above, in plain torch (what `_convert_weight_to_int4pack`
    gives on CUDA; the tests compare the two)."""
    n, k = q.shape
    t = q.to(torch.int64).reshape(n // 8, 8, k // (16 * inner), inner // 2, 2, 2, 4, 2)  # nt tn ko j i2 i1 tk odd
    nib = t.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // 8, k // (16 * inner), 32, inner // 2, 8)
    words = (nib << torch.arange(0, 32, 4, device=q.device)).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def tinygemm_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The int32 tile layout -> 4-bit values [N, K] (int32 0..15): tinygemm_pack's inverse."""
    nt, ko, _, half = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # [nt, ko, 32, inner/2, 8]
    nib = nib.reshape(nt, ko, 8, 4, half, 2, 2, 2)  # nt ko tn tk j odd i2 i1
    return nib.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(nt * 8, ko * 32 * half)


def dequantise_tinygemm(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The tile layout and its [K/g, N, 2] scales and zeros -> fp32 [N, K] (the reference for the kernel)."""
    q = tinygemm_unpack(packed).float()
    n, k = q.shape
    sz = scales_zeros.float().transpose(0, 1)  # [N, K/g, 2]
    g = k // sz.shape[1]
    return ((q.reshape(n, -1, g) - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k)


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
        w = layer.weight.data.float()
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        del layer.weight
        layer.weight = nn.Parameter((w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), requires_grad=False)
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
        """On CUDA, after loading: the weight into torch's tinygemm layout where that kernel can take it (bf16,
        N % 8 == 0, K in whole tiles, groups of 32..256). `qweight` becomes the int32 4-D tile layout and
        `scales_zeros` [K/g, N, 2] replaces `scales` and `zeros`; other layers keep the Triton kernels' layout."""
        n, k = layer.qweight.shape[0], layer.qweight.shape[1] * 8
        inner = tinygemm_inner_k_tiles(n, k, self.group, layer.scales.dtype)
        if not layer.qweight.is_cuda or inner is None:
            return
        packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(unpack_rows(layer.qweight)), inner)
        scales_zeros = tinygemm_scales_zeros(layer.scales, layer.zeros)
        del layer.qweight, layer.scales, layer.zeros
        layer.qweight = nn.Parameter(packed, requires_grad=False)
        layer.scales_zeros = nn.Parameter(scales_zeros, requires_grad=False)

    def matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False):
        if hasattr(layer, "scales_zeros"):
            return torch.ops.nanokyro.int4_tinygemm_linear(x, layer.qweight, layer.scales_zeros, self.group, bias,
                                                           gated)  # fmt: skip
        return torch.ops.nanokyro.int4_linear(x, layer.qweight, layer.scales, layer.zeros, bias, gated)


def make_method(qcfg: QuantConfig):
    return Fp8Method(qcfg) if qcfg.method == "fp8" else Int4Method(qcfg)


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
    weights into torch's tinygemm layout where it applies."""
    if qcfg is None:
        return
    for layer in linear_layers(model, qcfg):
        if qcfg.fmt == "online":
            layer.quant.quantise(layer)
        if isinstance(layer.quant, Int4Method):
            layer.quant.repack(layer)
    if torch.cuda.is_available():  # the full-precision weights' memory back, for the KV cache to measure
        torch.cuda.empty_cache()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- dequantisation (CPU, large batches, references) ----------------------------------------------------------


def fp8_group(k: int, columns: int) -> int:
    """Input features per scale column of an fp8 weight with k of them: the block (128; the last one partial),
    or all of them (per-channel, or a layer narrower than a block)."""
    return 1 << (-(-k // columns) - 1).bit_length()


def dequantise_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [N, K] with scales [N, ceil(K / gk)] -> fp32 [N, K]."""
    n, k = weight.shape
    gk = fp8_group(k, scale.shape[1])
    return weight.float() * scale.repeat_interleave(gk, 1)[:, :k]


def dequantise_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_rows(qweight).float()  # [N, K]
    g = q.shape[1] // scales.shape[1]
    return ((q.reshape(q.shape[0], -1, g) - zeros.float()[..., None]) * scales.float()[..., None]).reshape(q.shape)


def quantise_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation scales: x [M, K] -> (fp8 [M, K], fp32 [M, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _gate(y: torch.Tensor, gated: bool) -> torch.Tensor:
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def _scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight * scale).T with x quantised per token: `torch._scaled_mm` rowwise, K and N padded to
    multiples of 16 where they are not (CUDA needs it)."""
    n, k = weight.shape
    xq, xs = quantise_rows_fp8_cuda(x) if x.is_cuda else quantise_rows_fp8(x)
    pk, pn = -k % 16, -n % 16
    if pk or pn:
        xq, weight, scale = F.pad(xq, (0, pk)), F.pad(weight, (0, pk, 0, pn)), F.pad(scale, (0, 0, 0, pn), value=1.0)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=x.dtype)
    return y[:, :n] if pn else y


@torch.library.custom_op("nanokyro::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               gated: bool, w8a8: bool) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for fp8 w [N, K] with scales [N, K / gk]; `gated`: w stacks gate and up and the
    result is silu(x @ gate.T) * (x @ up.T). `w8a8` (per-channel scales [N, 1]): from GEMV_MAX_ROWS rows up,
    activations are quantised per token too."""
    if x.is_cuda and (x.shape[0] <= GEMV_MAX_ROWS or not w8a8):
        return _gemv(x, weight, scale, None, bias, gated)
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
        return _gemv(x, qweight, scales, zeros, bias, gated)
    if x.is_cuda:
        y = F.linear(x, dequantise_int4_cuda(qweight, scales, zeros, x.dtype), bias)
    else:
        y = F.linear(x, dequantise_int4(qweight, scales, zeros).to(x.dtype), bias)
    return _gate(y, gated)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, bias, gated):
    return x.new_empty(x.shape[0], qweight.shape[0] // 2 if gated else qweight.shape[0])


@torch.library.custom_op("nanokyro::int4_tinygemm_linear", mutates_args=())
def int4_tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                         bias: torch.Tensor | None, gated: bool) -> torch.Tensor:  # fmt: skip
    """x [M, K] bf16 @ w.T (+ bias) for 4-bit w in torch's tinygemm layout (Int4Method.repack): its kernel up to
    TINYGEMM_MAX_ROWS rows, above that the weight dequantised by one Triton kernel and cuBLAS."""
    if x.shape[0] <= TINYGEMM_MAX_ROWS:
        y = torch._weight_int4pack_mm(x.contiguous(), packed, group, scales_zeros)
    else:
        y = F.linear(x, dequantise_tinygemm_cuda(packed, scales_zeros))
    return _gate(y if bias is None else y + bias, gated)


@int4_tinygemm_linear.register_fake
def _(x, packed, scales_zeros, group, bias, gated):
    n = packed.shape[0] * 8
    return x.new_empty(x.shape[0], n // 2 if gated else n)


# -- Triton: the packed weight read once, dequantised in registers --------------------------------------------


class GemvConfig(NamedTuple):
    """A setting of the Triton kernels. GEMV (dot False): every program streams `block_n` weight rows, `block_k`
    input features at a time, products summed in fp32 registers; `prefetch` (FP8 per-channel, one row) issues
    the next tile's load before this tile's products (`reduce_once`: no cross-lane sum per step). Tiles (dot
    True): tensor-core dots of `block_m` rows by `block_n` features. With split_k > 1 (not gated) `split_k`
    programs share the rows' input features and their fp32 partial sums are added after."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    dot: bool
    num_stages: int = 1
    split_k: int = 1
    prefetch: bool = False
    reduce_once: bool = False  # with prefetch: products summed elementwise over the steps, across lanes once
    vec: int = 0  # > 0: FP8 per-channel, one row: fp8_row_kernel, weight loads of `vec` bytes per lane
    x_2d: bool = False  # fp8_row_kernel: x loaded in the weight tile's shape (the same register layout)


C = GemvConfig
# By rows, from the H200 sweep in docs/PERFORMANCE.md (`python -m nanokyro.benchmarks.quant_kernels`, llama-3.1-8b's
# projections). FP8 per-channel at one and two rows takes a setting per kind of layer (gate/up; down, K > 8192; the
# rest); block-wise FP8 keeps the one-row GEMV it was tested with; 3 to 16 rows take tensor-core tiles. The int4
# settings are untuned: int4 on CUDA takes tinygemm wherever its layout applies.
FP8_CHANNEL_CONFIG = {
    1: {"gated": C(1, 16, 2048, 4, False), "long": C(1, 8, 1024, 4, False, prefetch=True),
        None: C(1, 16, 512, 4, False, prefetch=True)},
    2: {"gated": C(16, 32, 256, 4, True, 3), None: C(2, 8, 2048, 4, False)},
}  # fmt: skip
GEMV_CONFIG = {
    "fp8": {1: C(1, 4, 2048, 4, False), 16: C(16, 32, 256, 4, True, 3), 64: C(64, 64, 128, 4, True, 3),
            None: C(128, 128, 128, 8, True, 3)},
    "int4": {1: C(1, 4, 2048, 4, False), 4: C(4, 4, 512, 4, False), 16: C(16, 32, 256, 4, True, 3),
             64: C(64, 64, 256, 4, True, 3), None: C(128, 128, 256, 8, True, 3)},
}  # fmt: skip


def gemv_config(M: int, K: int, int4: bool, per_row: bool, gated: bool) -> GemvConfig:
    """The setting for an [M, K] input (tables above)."""
    if per_row and M in FP8_CHANNEL_CONFIG:
        by_kind = FP8_CHANNEL_CONFIG[M]
        return by_kind.get("gated" if gated else "long" if K > 8192 else None, by_kind[None])
    configs = GEMV_CONFIG["int4" if int4 else "fp8"]
    return configs[next((r for r in configs if r and r >= M), None)]


def _gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None,
          bias: torch.Tensor | None, gated: bool, config: GemvConfig | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] against fp8 `weight` [N, K] (zeros None) or int4 `weight` [N, K/8] with `zeros`, both with
    `scale` [N, groups]: one Triton kernel that dequantises the packed weight in registers. `config` overrides
    GEMV_CONFIG's entry (the benchmark's sweep)."""
    import triton

    M, K = x.shape
    int4 = zeros is not None
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    per_row = not int4 and scale.shape[1] == 1
    group = K // scale.shape[1] if int4 else fp8_group(K, scale.shape[1])
    config = config or gemv_config(M, K, int4, per_row, gated)
    if config.vec and M == 1 and not int4 and per_row:
        return _fp8_row(x, weight, scale, bias, gated, config)
    block_m, block_n, block_k, num_warps, use_dot, num_stages, split, prefetch, reduce_once = config[:9]
    prefetch = prefetch and not int4 and per_row and block_m == 1 and not use_dot
    if not int4 and not per_row:  # fp8 tiles step one scale block at a time
        block_k = group if use_dot else max(group, min(block_k, triton.next_power_of_2(K)))
    elif not use_dot:
        block_k = max(min(block_k, triton.next_power_of_2(K)), group if int4 else 64)
    if gated and not use_dot and block_n > 1:
        block_n //= 2  # the same weight tile: half gate rows, half up rows
    split = 1 if gated else min(split, triton.cdiv(K, block_k))
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k  # input features per split, whole blocks
    group = block_k if per_row else group  # (unused with per-row scales)
    x = x if x.stride(1) == 1 else x.contiguous()
    y = x.new_empty(M, N) if split == 1 else x.new_empty(split * M, N, dtype=torch.float32)
    qgemv_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m), triton.cdiv(K, k_split))](
        x, weight, scale, zeros if int4 else scale, bias if bias is not None and split == 1 else scale, y, M, N, K,
        k_split, x.stride(0), weight.stride(0), scale.stride(0), y.stride(0), int4=int4, per_row=per_row,
        group=group, has_bias=bias is not None and split == 1, gated=gated, use_dot=use_dot, prefetch=prefetch,
        reduce_once=reduce_once, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if split == 1:
        return y
    y = y.view(-1, M, N).sum(0)
    return (y if bias is None else y + bias).to(x.dtype)


def _fp8_row(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, gated: bool,
             config: GemvConfig) -> torch.Tensor:  # fmt: skip
    """One row against fp8 `weight` [N, K] with per-row scales [N, 1]: fp8_row_kernel."""
    import triton

    K = x.shape[1]
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    block_n = max(config.block_n // 2, 1) if gated else config.block_n
    block_k = min(config.block_k, triton.next_power_of_2(K))
    y = x.new_empty(1, N)
    fp8_row_kernel[(triton.cdiv(N, block_n),)](
        x, weight, scale, bias if bias is not None else scale, y, N, K, weight.stride(0), scale.stride(0),
        has_bias=bias is not None, gated=gated, x_2d=config.x_2d, vec=config.vec, block_n=block_n, block_k=block_k,
        num_warps=config.num_warps, num_stages=1,
    )  # fmt: skip
    return y


def quantise_rows_fp8_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantise_rows_fp8 as one Triton kernel (one program per row, the row in registers): torch's ops take a
    pass over x each."""
    import triton

    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    xq, scale = torch.empty(m, k, dtype=FP8, device=x.device), torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantise_rows_kernel[(m,)](x, xq, scale, k, x.stride(0), block=block, num_warps=min(max(block // 512, 1), 16))
    return xq, scale


def dequantise_int4_cuda(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """dequantise_int4 as one Triton kernel: the packed weight read once, [N, K] written once in `dtype`."""
    import triton

    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    _dequant_int4_kernel[(triton.cdiv(n, 16), triton.cdiv(k // 8, 64))](
        qweight, scales, zeros, out, n, k, qweight.stride(0), scales.stride(0), group=k // scales.shape[1],
        block_n=16, block_p=64,
    )  # fmt: skip
    return out


def dequantise_tinygemm_cuda(packed: torch.Tensor, scales_zeros: torch.Tensor,
                              block_n: int = 8, block_k: int = 512) -> torch.Tensor:  # fmt: skip
    """dequantise_tinygemm as one Triton kernel, to bf16: every output tile written contiguously, its packed
    words gathered (each word feeds 8 outputs of 8 rows: they come from L1)."""
    import triton

    nt, ko, _, half = packed.shape
    n, k = nt * 8, ko * 32 * half
    out = torch.empty(n, k, dtype=torch.bfloat16, device=packed.device)
    _dequant_tinygemm_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        packed, scales_zeros, out, n, k, group=k // scales_zeros.shape[0], inner=half * 2, block_n=block_n,
        block_k=block_k,
    )  # fmt: skip
    return out


try:  # the kernels are compiled on first use; the CPU only ever runs them under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def partial(x, w_rows, s_rows, k0, K, n_ok, per_row: tl.constexpr, group: tl.constexpr, use_dot: tl.constexpr,
                block_m: tl.constexpr, block_n: tl.constexpr, block_k: tl.constexpr):  # fmt: skip
        """x [block_m, block_k] (fp32, or x's dtype with use_dot) times fp8 weight rows over input features
        [k0, k0 + block_k) -> [block_m, block_n] fp32, scaled (unless per_row: the caller scales at the end)."""
        rk = k0 + tl.arange(0, block_k)
        wq = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0,
                     eviction_policy="evict_first")  # fmt: skip
        w = wq.to(tl.float32)
        if use_dot and per_row:  # fp8 straight to x's dtype
            out = tl.dot(x, tl.trans(wq.to(x.dtype)))
        elif use_dot:  # block_k is one scale block
            w = w * tl.load(s_rows + k0 // group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            out = tl.dot(x, tl.trans(w.to(x.dtype)))
        elif per_row:
            out = tl.sum(x[:, None, :] * w[None, :, :], 2)
        else:
            ng: tl.constexpr = block_k // group
            prod = x[:, None, :] * w[None, :, :]  # [block_m, block_n, block_k]
            dots = tl.sum(tl.reshape(prod, (block_m, block_n, ng, group)), 3)  # per block: [block_m, block_n, ng]
            rg = k0 // group + tl.arange(0, ng)
            s = tl.load(s_rows + rg[None, :], mask=n_ok[:, None] & (rg < tl.cdiv(K, group))[None, :], other=0.0)
            out = tl.sum(dots * s.to(tl.float32)[None, :, :], 2)
        return out

    @triton.jit
    def fp8_row_prefetched(x_ptr, w_rows, k_lo, k_hi, n_ok, reduce_once: tl.constexpr, block_n: tl.constexpr,
                           block_k: tl.constexpr):  # fmt: skip
        """One row's x @ w.T over input features [k_lo, k_hi) of fp8 rows, unscaled, fp32 [1, block_n]: the next
        tile's load is issued before this tile's products, so two tiles per program are in flight. `reduce_once`:
        products summed elementwise over the steps and across lanes at the end (no shuffles or barrier per step)."""
        rk = k_lo + tl.arange(0, block_k)
        w_next = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < k_hi)[None, :], other=0.0,
                         eviction_policy="evict_first")  # fmt: skip
        acc = tl.zeros((block_n,), tl.float32)
        acc2 = tl.zeros((block_n, block_k), tl.float32)
        for k0 in range(k_lo, k_hi, block_k):
            w = w_next
            rk_next = k0 + block_k + tl.arange(0, block_k)
            w_next = tl.load(w_rows + rk_next[None, :], mask=n_ok[:, None] & (rk_next < k_hi)[None, :], other=0.0,
                             eviction_policy="evict_first")  # fmt: skip
            rk = k0 + tl.arange(0, block_k)
            x = tl.load(x_ptr + rk, mask=rk < k_hi, other=0.0).to(tl.float32)
            if reduce_once:
                acc2 += x[None, :] * w.to(tl.float32)
            else:
                acc += tl.sum(x[None, :] * w.to(tl.float32), 1)
        if reduce_once:
            acc = tl.sum(acc2, 1)
        return acc[None, :]

    @triton.jit
    def partial_int4(x_ptr, x_stride, rm, m_ok, w_rows, s_rows, z_rows, k0, K, n_ok, group: tl.constexpr,
                     use_dot: tl.constexpr, block_k: tl.constexpr):  # fmt: skip
        """x @ w.T over input features [k0, k0 + block_k) of int4 rows, fp32 [block_m, block_n]. Packed column j
        holds features 8j..8j+7, so the tile is 8 strided slices: nibble i of every packed column against x's
        features 8j + i (no reshape of the unpacked tile, which costs Triton a layout shuffle)."""
        rp = k0 // 8 + tl.arange(0, block_k // 8)
        p_ok = n_ok[:, None] & (rp < K // 8)[None, :]
        p = tl.load(w_rows + rp[None, :], mask=p_ok, other=0, eviction_policy="evict_first")
        gi = (rp * 8) // group  # each packed column lies in one group
        s = tl.load(s_rows + gi[None, :], mask=p_ok, other=0.0).to(tl.float32)
        zs = tl.load(z_rows + gi[None, :], mask=p_ok, other=0.0).to(tl.float32) * s
        acc = tl.zeros((rm.shape[0], p.shape[0]), tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + rm[:, None] * x_stride + (rp * 8 + i)[None, :],
                         mask=m_ok[:, None] & (rp < K // 8)[None, :], other=0.0)  # fmt: skip
            wi = ((p >> (4 * i)) & 0xF).to(tl.float32) * s - zs  # (q - zero) * scale
            if use_dot:
                acc += tl.dot(xi, tl.trans(wi.to(xi.dtype)))
            else:
                acc += tl.sum(xi.to(tl.float32)[:, None, :] * wi[None, :, :], 2)
        return acc

    @triton.jit
    def partial_int4_row(x_ptr, w_ptr, s_rows, z_rows, rn, k0, K, w_stride, n_ok, group: tl.constexpr,
                         block_k: tl.constexpr):  # fmt: skip
        """One row's x @ w.T over input features [k0, k0 + block_k) of int4 rows -> [1, block_n] fp32, every tile
        loaded in its natural shape (no gathers, no reshapes): packed [block_n, groups, group/8], x [groups,
        group/8, 8], scales and zeros [block_n, groups]."""
        g8: tl.constexpr = group // 8
        ng: tl.constexpr = block_k // group
        rg = k0 // group + tl.arange(0, ng)
        pcol = rg[:, None] * g8 + tl.arange(0, g8)[None, :]  # [ng, g8] packed columns
        p_ok = pcol < K // 8
        w3 = w_ptr + rn[:, None, None].to(tl.int64) * w_stride + pcol[None, :, :]
        p = tl.load(w3, mask=n_ok[:, None, None] & p_ok[None, :, :], other=0, eviction_policy="evict_first")
        xk = pcol[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [ng, g8, 8]
        x = tl.load(x_ptr + xk, mask=p_ok[:, :, None], other=0.0).to(tl.float32)
        q = (p[:, :, :, None] >> (tl.arange(0, 8) * 4)[None, None, None, :]) & 0xF  # [block_n, ng, g8, 8]
        dots = tl.sum(tl.sum(q.to(tl.float32) * x[None, :, :, :], 3), 2)  # [block_n, ng]: sum x q per group
        xs = tl.sum(tl.sum(x, 2), 1)  # [ng]
        g_ok = n_ok[:, None] & (rg < K // group)[None, :]
        s = tl.load(s_rows + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
        z = tl.load(z_rows + rg[None, :], mask=g_ok, other=0.0).to(tl.float32)
        return tl.sum((dots - z * xs[None, :]) * s, 1)[None, :]  # sum x (q - z) s

    @triton.jit
    def qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, k_split, x_stride, w_stride, s_stride,
                     y_stride, int4: tl.constexpr, per_row: tl.constexpr, group: tl.constexpr,
                     has_bias: tl.constexpr, gated: tl.constexpr, use_dot: tl.constexpr, prefetch: tl.constexpr,
                     reduce_once: tl.constexpr, block_m: tl.constexpr, block_n: tl.constexpr,
                     block_k: tl.constexpr):  # fmt: skip
        """y = x @ w.T (+ b); `gated`: w is [gate; up], 2N rows, and y = silu(x @ gate.T) * (x @ up.T). Program
        (., ., s) sums input features [s k_split, (s + 1) k_split) into rows s M.. of y (one split: all of them)."""
        ks = tl.program_id(2)
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rm = tl.program_id(1) * block_m + tl.arange(0, block_m)
        n_ok, m_ok = rn < N, rm < M
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_stride  # [block_n, 1]
        s_rows = s_ptr + rn[:, None].to(tl.int64) * s_stride
        z_rows = z_ptr + rn[:, None].to(tl.int64) * s_stride
        s_vec = s_ptr + rn.to(tl.int64) * s_stride  # [block_n]: an fp8 tile's one scale column per step
        acc = tl.zeros((block_m, block_n), tl.float32)
        up = tl.zeros((block_m, block_n), tl.float32)
        k_lo, k_hi = ks * k_split, tl.minimum(K, (ks + 1) * k_split)
        if prefetch:
            acc += fp8_row_prefetched(x_ptr, w_rows, k_lo, k_hi, n_ok, reduce_once, block_n, block_k)
            if gated:
                up += fp8_row_prefetched(x_ptr, w_rows + N * w_stride, k_lo, k_hi, n_ok, reduce_once, block_n,
                                         block_k)  # fmt: skip
        for k0 in range(k_lo, k_hi if not prefetch else k_lo, block_k):
            if int4 and block_m == 1:
                acc += partial_int4_row(x_ptr, w_ptr, s_rows, z_rows, rn, k0, K, w_stride, n_ok, group, block_k)
                if gated:
                    up += partial_int4_row(x_ptr, w_ptr, s_rows + N * s_stride, z_rows + N * s_stride, rn + N, k0, K,
                                           w_stride, n_ok, group, block_k)  # fmt: skip
            elif int4:
                acc += partial_int4(x_ptr, x_stride, rm, m_ok, w_rows, s_rows, z_rows, k0, K, n_ok, group, use_dot,
                                    block_k)  # fmt: skip
                if gated:
                    up += partial_int4(x_ptr, x_stride, rm, m_ok, w_rows + N * w_stride, s_rows + N * s_stride,
                                       z_rows + N * s_stride, k0, K, n_ok, group, use_dot, block_k)  # fmt: skip
            else:
                rk = k0 + tl.arange(0, block_k)
                x = tl.load(x_ptr + rm[:, None] * x_stride + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :],
                            other=0.0)  # fmt: skip
                if not use_dot:
                    x = x.to(tl.float32)
                if use_dot and not per_row:  # one block per step: the scales are one column
                    acc += partial(x, w_rows, s_vec, k0, K, n_ok, per_row, group, use_dot, block_m, block_n, block_k)
                    if gated:
                        up += partial(x, w_rows + N * w_stride, s_vec + N * s_stride, k0, K, n_ok, per_row, group,
                                      use_dot, block_m, block_n, block_k)  # fmt: skip
                else:
                    acc += partial(x, w_rows, s_rows, k0, K, n_ok, per_row, group, use_dot, block_m, block_n, block_k)
                    if gated:
                        up += partial(x, w_rows + N * w_stride, s_rows + N * s_stride, k0, K, n_ok, per_row, group,
                                      use_dot, block_m, block_n, block_k)  # fmt: skip
        if per_row:
            acc *= tl.load(s_ptr + rn * s_stride, mask=n_ok, other=0.0)[None, :]
            if gated:
                up *= tl.load(s_ptr + (N + rn) * s_stride, mask=n_ok, other=0.0)[None, :]
        if has_bias:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if gated:  # rounded as the unfused ops round: gate and up to y's dtype first
            gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = gate * tl.sigmoid(gate) * up.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + (ks * M + rm[:, None]) * y_stride + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip

    @triton.jit
    def fp8_rows_sum(x_ptr, w_rows, K, n_ok, x_2d: tl.constexpr, vec: tl.constexpr, block_n: tl.constexpr,
                     block_k: tl.constexpr):  # fmt: skip
        """sum over K of x * w for fp8 rows w_rows [block_n, 1] (pointers), fp32 [block_n]. Pointers advance by a
        tile per step and the next tile's load is issued before this one's products; products are summed
        elementwise and across lanes once at the end. Weight loads of `vec` bytes match x's 16-byte bf16 loads
        (vec 8) so both sit in one register layout, with no shuffle through shared memory per step."""
        cols = tl.max_contiguous(tl.arange(0, block_k), vec)[None, :]
        w_ptrs = w_rows + cols
        if x_2d:
            x_ptrs = x_ptr + cols + tl.zeros((block_n, 1), tl.int32)
        else:
            x_ptrs = x_ptr + cols
        w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < K), other=0.0, eviction_policy="evict_first")
        acc = tl.zeros((block_n, block_k), tl.float32)
        for k0 in range(0, K, block_k):
            w = w_next
            w_ptrs += block_k
            w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < K - k0 - block_k), other=0.0,
                             eviction_policy="evict_first")  # fmt: skip
            x = tl.load(x_ptrs, mask=cols < K - k0, other=0.0).to(tl.float32)
            x_ptrs += block_k
            acc += x * w.to(tl.float32)
        return tl.sum(acc, 1)

    @triton.jit
    def fp8_row_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, w_stride, s_stride, has_bias: tl.constexpr,
                       gated: tl.constexpr, x_2d: tl.constexpr, vec: tl.constexpr, block_n: tl.constexpr,
                       block_k: tl.constexpr):  # fmt: skip
        """y [1, N] = x [1, K] @ (w * scale).T (+ b) for fp8 w with per-row scales; `gated` as qgemv_kernel."""
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_stride
        acc = fp8_rows_sum(x_ptr, w_rows, K, n_ok, x_2d, vec, block_n, block_k)
        acc *= tl.load(s_ptr + rn * s_stride, mask=n_ok, other=0.0)
        if has_bias:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if gated:
            up = fp8_rows_sum(x_ptr, w_rows + N * w_stride, K, n_ok, x_2d, vec, block_n, block_k)
            up *= tl.load(s_ptr + (N + rn) * s_stride, mask=n_ok, other=0.0)
            gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = gate * tl.sigmoid(gate) * up.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _dequant_int4_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, q_stride, s_stride, group: tl.constexpr,
                             block_n: tl.constexpr, block_p: tl.constexpr):  # fmt: skip
        """out [N, K] = (q - zero) * scale for a [block_n, 8 * block_p] tile."""
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rp = tl.program_id(1) * block_p + tl.arange(0, block_p)
        ok = (rn < N)[:, None] & (rp < K // 8)[None, :]
        rows = rn[:, None].to(tl.int64)
        p = tl.load(q_ptr + rows * q_stride + rp[None, :], mask=ok, other=0)
        gi = (rp * 8) // group
        s = tl.load(s_ptr + rows * s_stride + gi[None, :], mask=ok, other=0.0).to(tl.float32)
        zs = tl.load(z_ptr + rows * s_stride + gi[None, :], mask=ok, other=0.0).to(tl.float32) * s
        for i in tl.static_range(8):
            w = ((p >> (4 * i)) & 0xF).to(tl.float32) * s - zs
            tl.store(out_ptr + rows * K + (rp * 8 + i)[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant_tinygemm_kernel(p_ptr, sz_ptr, out_ptr, N, K, group: tl.constexpr, inner: tl.constexpr,
                                 block_n: tl.constexpr, block_k: tl.constexpr):  # fmt: skip
        """out [N, K] = (q - 8) * scale + zero for a [block_n, block_k] tile, q read from the tile layout (see
        tinygemm_pack): the word's index splits into a row part and a feature part."""
        half: tl.constexpr = inner // 2
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rk = tl.program_id(1) * block_k + tl.arange(0, block_k)
        ok = (rn < N)[:, None] & (rk < K)[None, :]
        kl = rk % (16 * inner)
        row_word = (rn // 8).to(tl.int64) * (K // (16 * inner)) * 32 * half + (rn % 8) * 4 * half
        col_word = (rk // (16 * inner)) * 32 * half + ((kl // 2) % 4) * half + kl // 32
        shift = 4 * ((kl % 2) * 4 + ((kl // 16) % 2) * 2 + (kl // 8) % 2)
        p = tl.load(p_ptr + row_word[:, None] + col_word[None, :], mask=ok, other=0)
        q = ((p >> shift[None, :]) & 0xF).to(tl.float32)
        sz = sz_ptr + ((rk // group)[None, :].to(tl.int64) * N + rn[:, None]) * 2
        s = tl.load(sz, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], ((q - 8) * s + z).to(out_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip

    @triton.jit
    def _quantise_rows_kernel(x_ptr, q_ptr, s_ptr, K, x_stride, block: tl.constexpr):
        """Row r of x -> fp8 with scale max|x| / 448 (as quantise_rows_fp8 rounds)."""
        row = tl.program_id(0)
        cols = tl.arange(0, block)
        x = tl.load(x_ptr + row * x_stride + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=cols < K)
        tl.store(s_ptr + row, scale)
