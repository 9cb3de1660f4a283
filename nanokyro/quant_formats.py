"""FP8 and 4-bit (AWQ) weight formats: which quantisation a checkpoint's config.json declares, its tensors re-laid
into the layout the linear layers hold (quant.py's docstring), the packed 4-bit layouts (the layers' rows, AWQ's,
the MMA fragments of quant_cuda.py) and the plain-torch dequantisation that the CPU runs and the kernels are
tested against.

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
- `quantization="int8"` on full-precision weights (the CPU; a speculative draft's): round-to-nearest symmetric
  int8 with per-output-channel scales, packed for fbgemm (quant.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's nibble i holds output feature AWQ_ORDER[i] of its 8
INT4_GROUPS = (32, 64, 128)  # input features per 4-bit scale that checkpoints may use (and the MMA kernels take)
METHODS = ("fp8", "awq", "int8")  # int8: online only, on the CPU (a speculative draft's; quant.py)


@dataclass(frozen=True)
class QuantConfig:
    """What the checkpoint holds (`fmt`) and what the layers become (`method`: "fp8", "awq" = int4, or "int8")."""

    method: str
    fmt: str  # "online" | "fp8-block" | "ct-fp8" | "awq-gemm" | "ct-w4a16"
    group_size: int = 128  # int4: input features per scale; fp8-block: the block's side
    ignore: tuple[str, ...] = field(default_factory=tuple)  # HF module names (or re:patterns) left dense
    lm_head: bool = False  # the LM head too, in per-channel FP8 (quantize_lm_head; quant.fp8_head)

    def quantises(self, hf_module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], hf_module):
                return False
            if hf_module == pattern or hf_module == f"model.{pattern}" or hf_module.endswith(f".{pattern}"):
                return False
        return True


def quant_config(qc: dict | None, requested: str | None, lm_head: bool = False) -> QuantConfig | None:
    """The quantisation of a model: its config.json's `quantization_config` (qc), or `requested` on
    full-precision weights. A checkpoint's own format is used only if it is what was asked for (or nothing was).
    `lm_head` (quantize_lm_head): the LM head in FP8 too, which only FP8 linear layers go with (their op multiplies
    it)."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} or None, not {requested!r}")
    if not qc:
        found = None if requested is None else QuantConfig(requested, "online")
    else:
        found = _checkpoint_format(qc)
        if requested is not None and requested != found.method:
            raise ValueError(f"the checkpoint is already quantised ({found.fmt}); it cannot be served as {requested!r}")
    if lm_head:
        if found is None or found.method != "fp8":
            raise ValueError("quantize_lm_head puts the LM head in FP8 beside FP8 linear layers: it needs "
                             "quantization='fp8' or an FP8 checkpoint, not "
                             + ("unquantised weights" if found is None else f"{found.method} ({found.fmt})"))
        found = replace(found, lm_head=True)
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
    if g not in INT4_GROUPS:
        raise ValueError(f"4-bit group size must be one of {', '.join(map(str, INT4_GROUPS))}, not {g}")
    return g


# -- checkpoint tensors -> the layers' layout -----------------------------------------------------------------


def checkpoint_tensors(qcfg: QuantConfig | None, tensors):
    """Rename and re-lay a pre-quantised checkpoint's tensors of quantised linear layers into the [out, ...]
    tensors the layers hold (quant.py's docstring); every other tensor passes through."""
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


# -- the MMA fragment layout (quant_cuda.py's kernels on CUDA) ------------------------------------------------
#
# int32 [N/16, K/64, 32, 4]: per strip of 16 output features and block of 64 input features, lane l's four words,
# one per 16-feature step j of the m16n8k16 tensor-core MMA whose A operand is the weight (its rows the outputs).
# Lane l holds the strip's rows r = l // 4 and r + 8, and input features 64 kb + 16 j + 4 (l % 4) + p, p = 0..3:
# the MMA sums over its 16 features in any order, so each lane takes four consecutive ones and reads x's with one
# 8-byte load. Nibble t of the word (bits 4t..4t+3) holds row r + 8 (t & 1), feature p = 2 ((t >> 1) & 1) + t // 4,
# so that the word shifted right by 4i and masked by one lop3 is A's register i (its low and high halves the
# nibbles t = i and i + 4) for i = 0..3. Beside it `scales_zeros` int32 [K/g, N]: the scale in the low 16 bits and
# -(MMA_MAGIC + zero) in the high 16, both in the model's dtype, which the kernel adds to MMA_MAGIC + q (the
# nibble under the magic number's exponent, exact) to get q - zero exactly.

MMA_MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}


def mma_layout_applies(n: int, k: int, group: int, dtype: torch.dtype, zeros: torch.Tensor,
                       gated: bool = False) -> bool:  # fmt: skip
    """Whether an [n, k] int4 weight in groups of `group` with `dtype` scales goes into the MMA layout: whole strips
    (`gated`: n stacks gate and up, each of which fills whole strips, as the GEMV pairs a gate strip with its up
    strip) and blocks, and zeros that are whole numbers 0..15 (MMA_MAGIC + zero is then exact in the dtype)."""
    if dtype not in MMA_MAGIC or group not in INT4_GROUPS or n % (32 if gated else 16) or k % 64 or k % group:
        return False
    z = zeros.float()
    return bool(((z == z.round()) & (z >= 0) & (z <= 15)).all())


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words 0..2^32 - 1 -> int32 with the same bits."""
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def mma_pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [N, K] (0..15) -> the int32 MMA layout above."""
    n, k = q.shape
    t = q.to(torch.int64).reshape(n // 16, 2, 8, k // 64, 4, 4, 2, 2)  # strip, r8, r, kb, j, l%4, p//2, p%2
    nib = t.permute(0, 3, 2, 5, 4, 7, 6, 1).reshape(n // 16, k // 64, 32, 4, 8)  # nibble t = 4 (p%2) + 2 (p//2) + r8
    return _int32((nib << torch.arange(0, 32, 4, device=q.device)).sum(-1))


def mma_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The int32 MMA layout -> 4-bit values [N, K] (int32 0..15): mma_pack's inverse."""
    strips, kbs = packed.shape[:2]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(strips, kbs, 8, 4, 4, 2, 2, 2)  # ., r, l%4, j, p%2, p//2, r8
    return nib.permute(0, 7, 2, 1, 4, 3, 6, 5).reshape(strips * 16, kbs * 64)


def mma_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales and zeros [N, K/g] of w = (q - zero) * scale -> the int32 [K/g, N] words above."""
    bits = lambda t: t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    negz = (-(MMA_MAGIC[scales.dtype] + zeros.float())).to(scales.dtype)
    return _int32(bits(scales) | (bits(negz) << 16)).t().contiguous()


def dequantise_mma(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The MMA layout and its scale/zero words -> fp32 [N, K] (the reference for the kernels)."""
    q = mma_unpack(packed).float()
    n, k = q.shape
    halves = lambda sh: ((scales_zeros.t() >> sh) & 0xFFFF).to(torch.int16).view(dtype).float()  # noqa: E731
    s, negz = halves(0), halves(16)  # [N, K/g]
    g = k // s.shape[1]
    return ((q.reshape(n, -1, g) + MMA_MAGIC[dtype] + negz[..., None]) * s[..., None]).reshape(n, k)


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
    """One scale per row, its max |x| mapped to FP8's max: x [M, K] -> (fp8 [M, K], fp32 [M, 1]). For activations
    the dynamic per-token scales; for a weight the per-output-feature ones (`quantization="fp8"` at load, and the
    LM head with `quantize_lm_head`)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
