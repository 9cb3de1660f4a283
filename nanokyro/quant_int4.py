"""4-bit weights on CUDA in a layout made for Triton kernels (quant.py's INT4_KERNELS = "triton"): the layout, its
repack from the layers' row layout at load, and three kernels reading it: a GEMV for a few rows, a dequantise +
tensor-core GEMM for more, and a dequantise to a dense weight for cuBLAS at prefill sizes.

The layout, `qweight` int32 [N, K/8]: input features in chunks of 32, four words per chunk; nibble i (bits
4i..4i+3) of word j of chunk c holds feature 32c + 4i + j. Why:
- A lane's 16-byte load of one chunk (four words) brings 32 features of one output row, and a warp's lanes read
  consecutive chunks: the loads are contiguous.
- Unpacking nibble i of a lane's four words gives features 32c + 4i + (0..3): the activations that multiply
  them are four consecutive values (one vector load), so no nibble needs a reshape or permutation, which would
  cost Triton a layout conversion. The dot over K does not care about K's order when x is read in the same one.
- A chunk lies in one group (groups are 32..128 features), so a lane applies one scale per chunk and row.
`scales` and `zs` [N, K/g] in the model's dtype: w = (q - 8) * scale - zs, zs = (zero - 8) * scale, which is
AWQ's (q - zero) * scale with the zero point premultiplied (centred on 8 to halve its rounding in bf16).

Dequantising a nibble costs no integer-to-float conversion (a quarter-rate instruction): the nibble masked in
place and OR-ed into the mantissa of 2^23 is the float 2^23 + q * 16^e exactly (e = i for nibbles 0..4; nibbles
5..7 come from the word shifted by 16, one shift for the three, e = i - 4), and one subtraction gives
(q - 8) * 16^e. The GEMV folds the 16^-e into x, which it loads once per tile for all rows of the tile, so a
weight costs a mask (LOP3), a subtraction and a multiply-add, and the scale and zero are applied once per chunk:
sum x (q - 8) s - zs sum x. The tiles fold 16^-e into the scale instead.

Settings by row count (INT4_CONFIG) come from the sweep in docs/PERFORMANCE.md
(`python -m nanokyro.benchmarks.quant_kernels --match int4`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nanokyro.quant_formats import unpack_rows

CHUNK = 32  # input features per four words
MAGIC = 0x4B000000  # the bits of the float 2^23: a value < 2^23 OR-ed into them is added to it


class Int4Config(NamedTuple):
    """A setting of the kernels. GEMV (dot False): every program streams `block_n` weight rows for up to `block_m`
    input rows, `block_k` features (whole chunks) at a time, products summed in fp32 registers elementwise and
    across lanes once at the end. Tiles (dot True): the weight tile dequantised in registers to x's dtype and
    multiplied on tensor cores into a [block_m, block_n] fp32 tile, `num_stages` loads in flight (block_k >= 128).
    Both: gated, half of block_n gate rows and half up rows; with split_k > 1 (not gated) `split_k` programs share
    a row's features and their fp32 partial sums are added after."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    dot: bool
    num_stages: int = 1
    split_k: int = 1


C = Int4Config
# The kernel by input rows (the first key >= the rows), up to quant.INT4_TRITON_DEQUANT_ROWS rows; untuned until
# the lead's sweep (docs/PERFORMANCE.md).
INT4_CONFIG = {1: C(1, 8, 4096, 4, False), 2: C(2, 8, 4096, 4, False), 16: C(16, 64, 128, 4, True, 4),
               64: C(64, 64, 256, 4, True, 3), None: C(128, 128, 128, 8, True, 3)}  # fmt: skip


# -- the layout ---------------------------------------------------------------------------------------------------


def int4k_pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [N, K] (0..15, K in whole chunks of 32) -> the int32 [N, K/8] layout above."""
    n, k = q.shape
    if k % CHUNK:
        raise ValueError(f"the int4 kernels' layout needs input features ({k}) in whole chunks of {CHUNK}")
    nib = q.to(torch.int32).reshape(n, k // CHUNK, 8, 4).transpose(2, 3)  # [n, chunk, word j, nibble i]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (nib << shifts).sum(-1, dtype=torch.int32).reshape(n, k // 8)  # disjoint bits: the sum is an OR


def int4k_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The layout -> 4-bit values [N, K] (int32 0..15): int4k_pack's inverse."""
    n, w = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.reshape(n, w // 4, 4, 1) >> shifts) & 0xF  # [n, chunk, word j, nibble i]
    return nib.transpose(2, 3).reshape(n, w * 8)


def int4k_repack(qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The layers' row layout (qweight [N, K/8], feature 8j + i in bits 4i.., w = (q - zero) * scale) -> the
    layout above: (qweight [N, K/8], scales [N, K/g], zs [N, K/g]), scales and zs in scales' dtype."""
    zs = ((zeros.float() - 8) * scales.float()).to(scales.dtype)
    return int4k_pack(unpack_rows(qweight)), scales.contiguous(), zs


def dequantise_int4k(qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """The layout with its scales and zs -> fp32 [N, K] (the reference the kernels are tested against)."""
    q = int4k_unpack(qweight).float()
    n, k = q.shape
    g = k // scales.shape[1]
    return ((q.reshape(n, -1, g) - 8) * scales.float()[..., None] - zs.float()[..., None]).reshape(n, k)


# -- launchers ----------------------------------------------------------------------------------------------------


def int4k_config(rows: int) -> Int4Config:
    return INT4_CONFIG[next((r for r in INT4_CONFIG if r and r >= rows), None)]


def int4k_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor,
                 bias: torch.Tensor | None, gated: bool, config: Int4Config | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for w in the layout above, one kernel (two with split-K); `gated`: w stacks gate
    and up [2N, K] and the result is silu(x @ gate.T) * (x @ up.T) [M, N]. `config` overrides INT4_CONFIG's."""
    import triton

    M, K = x.shape
    if K != qweight.shape[1] * 8:
        raise ValueError(f"x has {K} features, the weight {qweight.shape[1] * 8}")
    N = qweight.shape[0] // 2 if gated else qweight.shape[0]
    config = config or int4k_config(M)
    group = K // scales.shape[1]
    block_m, block_n, block_k, num_warps, dot, num_stages, split = config
    # tiles: each nibble's dot takes block_k / 8 features, and tensor cores take 16 at least
    block_k = max(128 if dot else CHUNK, min(block_k, triton.next_power_of_2(K)))
    if gated and block_n > (16 if dot else 1):
        block_n //= 2  # the same bytes per step (and registers): half gate rows, half up rows
    split = 1 if gated else min(split, triton.cdiv(K, block_k))
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k  # features per split, whole steps
    x = x if x.stride(1) == 1 else x.contiguous()
    y = x.new_empty(M, N) if split == 1 else x.new_empty(split, M, N, dtype=torch.float32)
    has_bias = bias is not None and split == 1
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), triton.cdiv(K, k_split))
    kernel, extra = (_gemm_kernel, dict(ieee=x.dtype == torch.float32)) if dot else (_gemv_kernel, {})
    kernel[grid](
        x, qweight, scales, zs, bias if has_bias else scales, y, M, N, K, k_split, x.stride(0), qweight.stride(0),
        scales.stride(0), N, MAGIC, group=group, has_bias=has_bias, gated=gated, block_m=block_m, block_n=block_n,
        block_k=block_k, num_warps=num_warps, num_stages=num_stages, **extra,
    )  # fmt: skip
    if split == 1:
        return y
    y = y.sum(0)
    return (y if bias is None else y + bias).to(x.dtype)


def dequantise_int4k_cuda(qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, dtype: torch.dtype,
                          block_n: int = 16, block_w: int = 64) -> torch.Tensor:  # fmt: skip
    """dequantise_int4k as one Triton kernel: the packed weight read once, [N, K] in `dtype` written once (each
    nibble's features are four consecutive ones: 8-byte stores for bf16)."""
    import triton

    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // 8, block_w))](
        qweight, scales, zs, out, n, k, qweight.stride(0), scales.stride(0), MAGIC, group=k // scales.shape[1],
        block_n=block_n, block_w=block_w,
    )  # fmt: skip
    return out


try:  # the kernels are compiled on first use; the CPU only ever runs them under TRITON_INTERPRET=1
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _nibble(p, p_hi, magic, i: tl.constexpr):
        """Nibble i of words p (p_hi = p >> 16, logical) as the float (q - 8) * 16^e: masked in place (nibbles
        0..4 at bits 4i.. of p, e = i; 5..7 at bits 4e.. of p_hi, e = i - 4), OR-ed into the mantissa of 2^23
        (`magic`'s bits), 2^23 + 8 * 16^e subtracted. (`magic` is an argument: as a constant, ptxas would hold the
        masks in registers instead and rematerialise them, one more instruction per nibble.)"""
        e: tl.constexpr = i if i < 5 else i - 4
        mask: tl.constexpr = 0xF << (4 * e)
        if i < 5:
            bits = (p & mask) | magic
        else:
            bits = (p_hi & mask) | magic
        return bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (16**e))

    @triton.jit
    def _high_half(p):
        """p >> 16 without the sign (a logical shift)."""
        return (p.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)

    @triton.jit
    def _unscaled(x, i: tl.constexpr):
        """x times 16^-e: the factor _nibble(i) leaves on its values undone."""
        e: tl.constexpr = i if i < 5 else i - 4
        return x * (1.0 / (16**e))

    @triton.jit
    def _epilogue(acc, up, b_ptr, y_ptr, rm, rn, m_ok, n_ok, N, y_row, has_bias: tl.constexpr, gated: tl.constexpr):
        """Bias, the gate (rounded as the unfused ops round: gate and up to y's dtype first), the store."""
        if has_bias:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if gated:
                up += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if gated:
            gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = gate * tl.sigmoid(gate) * up.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + y_row[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, k_split, x_stride, w_stride, s_stride,
                     y_cols, magic, group: tl.constexpr, has_bias: tl.constexpr, gated: tl.constexpr,
                     block_m: tl.constexpr, block_n: tl.constexpr, block_k: tl.constexpr):  # fmt: skip
        """y = x @ w.T (+ b) for a few rows; `gated`: w is [gate; up] (2N rows) and y = silu(x @ gate.T) * (x @
        up.T). Program (., ., s) sums features [s k_split, (s + 1) k_split) into y's slice s (one split: y).

        Every tile is 4-D, [x rows, weight rows, chunks, words of a chunk] with 1 where it does not vary, so that
        Triton gives the weight words, x and the scales one register layout (lanes and warps along the chunks,
        a lane's four words in one 16-byte load): no shuffles through shared memory inside the loop."""
        chunks: tl.constexpr = block_k // 32
        ks = tl.program_id(2)
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rm = tl.program_id(1) * block_m + tl.arange(0, block_m)
        n_ok, m_ok = rn < N, rm < M
        n4, m4 = rn[None, :, None, None], rm[:, None, None, None]
        rc = tl.arange(0, chunks)[None, None, :, None]
        rj = tl.arange(0, 4)[None, None, None, :]
        w_rows = w_ptr + n4 * w_stride + rc * 4 + rj  # [1, block_n, chunks, 4]: a step's words
        s_rows = n4.to(tl.int64) * s_stride  # [1, block_n, 1, 1]
        x_rows = x_ptr + m4 * x_stride + rc * 32 + rj  # [block_m, 1, chunks, 4]: nibble 0's features
        acc = tl.zeros((block_m, block_n, chunks, 1), tl.float32)
        up = tl.zeros((block_m, block_n, chunks, 1), tl.float32)
        k_lo, k_hi = ks * k_split, tl.minimum(K, (ks + 1) * k_split)
        for k_step in range(k_lo, k_hi, block_k):
            k0 = tl.multiple_of(k_step, 32)  # k_split is in whole steps: 16-byte loads stay aligned
            c_ok = k0 + rc * 32 < k_hi  # K is in whole chunks
            w_ok = (n4 < N) & c_ok
            x_ok = (m4 < M) & c_ok
            w0 = tl.multiple_of(k0 // 8, 4)
            p = tl.load(w_rows + w0, mask=w_ok, other=0, eviction_policy="evict_first")
            p_hi = _high_half(p)
            pu, pu_hi = p, p_hi
            if gated:
                pu = tl.load(w_rows + N * w_stride + w0, mask=w_ok, other=0, eviction_policy="evict_first")
                pu_hi = _high_half(pu)
            xsum = tl.zeros((block_m, 1, chunks, 1), tl.float32)
            t = tl.zeros((block_m, block_n, chunks, 4), tl.float32)  # x (q - 8), summed over nibbles
            tu = tl.zeros((block_m, block_n, chunks, 4), tl.float32)
            for i in tl.static_range(8):
                x = tl.load(x_rows + k0 + 4 * i, mask=x_ok, other=0.0).to(tl.float32)
                xsum += tl.sum(x, 3, keep_dims=True)
                x = _unscaled(x, i)
                t += x * _nibble(p, p_hi, magic, i)
                if gated:
                    tu += x * _nibble(pu, pu_hi, magic, i)
            g = s_rows + (k0 + rc * 32) // group  # [1, block_n, chunks, 1]: each chunk's scale
            s_ok = (n4 < N) & c_ok
            s = tl.load(s_ptr + g, mask=s_ok, other=0.0).to(tl.float32)
            zs = tl.load(z_ptr + g, mask=s_ok, other=0.0).to(tl.float32)
            acc += tl.sum(t, 3, keep_dims=True) * s - zs * xsum  # sum x (q - 8) s - zs sum x, per chunk
            if gated:
                s = tl.load(s_ptr + N * s_stride + g, mask=s_ok, other=0.0).to(tl.float32)
                zs = tl.load(z_ptr + N * s_stride + g, mask=s_ok, other=0.0).to(tl.float32)
                up += tl.sum(tu, 3, keep_dims=True) * s - zs * xsum
        acc, up = tl.sum(tl.sum(acc, 3), 2), tl.sum(tl.sum(up, 3), 2)
        _epilogue(acc, up, b_ptr, y_ptr, rm, rn, m_ok, n_ok, y_cols, ks * M + rm, has_bias, gated)

    @triton.jit
    def _dequant_tile(p, p_hi, s, zs, magic, i: tl.constexpr, dtype: tl.constexpr):
        """Nibble i of words p [block_n, words] (p_hi = p >> 16, logical) as (q - 8) * s - zs in `dtype` (s, zs
        per word, fp32): _nibble's value times s 16^-e (the same product for nibbles i and i + 4, computed once)."""
        e: tl.constexpr = i if i < 5 else i - 4
        return (_nibble(p, p_hi, magic, i) * (s * (1.0 / (16**e))) - zs).to(dtype)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, k_split, x_stride, w_stride, s_stride,
                     y_cols, magic, group: tl.constexpr, has_bias: tl.constexpr, gated: tl.constexpr,
                     ieee: tl.constexpr, block_m: tl.constexpr, block_n: tl.constexpr,
                     block_k: tl.constexpr):  # fmt: skip
        """y = x @ w.T (+ b), `gated` and split-K as _gemv_kernel: each step's [block_n, block_k / 8] words
        dequantised in registers to x's dtype, nibble by nibble, and multiplied on tensor cores with x's matching
        features."""
        words: tl.constexpr = block_k // 8
        ks = tl.program_id(2)
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rm = tl.program_id(1) * block_m + tl.arange(0, block_m)
        n_ok, m_ok = rn < N, rm < M
        rw = tl.arange(0, words)
        xk = (rw // 4) * 32 + rw % 4  # nibble 0's feature of each word, from the step's first
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_stride
        s_rows = rn[:, None].to(tl.int64) * s_stride
        x_rows = x_ptr + rm[:, None] * x_stride + xk[None, :]
        acc = tl.zeros((block_m, block_n), tl.float32)
        up = tl.zeros((block_m, block_n), tl.float32)
        precision: tl.constexpr = "ieee" if ieee else "tf32"  # fp32 x: no rounding to tf32
        k_lo, k_hi = ks * k_split, tl.minimum(K, (ks + 1) * k_split)
        for k_step in range(k_lo, k_hi, block_k):
            k0 = tl.multiple_of(k_step, 32)  # as in _gemv_kernel
            k_ok = k0 // 8 + rw < k_hi // 8
            w_ok = n_ok[:, None] & k_ok[None, :]
            x_ok = m_ok[:, None] & k_ok[None, :]
            g = s_rows + ((k0 + rw * 8) // group)[None, :]
            p = tl.load(w_rows + k0 // 8 + rw[None, :], mask=w_ok, other=0)
            p_hi = _high_half(p)
            s = tl.load(s_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            zs = tl.load(z_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            if gated:
                pu = tl.load(w_rows + N * w_stride + k0 // 8 + rw[None, :], mask=w_ok, other=0)
                pu_hi = _high_half(pu)
                su = tl.load(s_ptr + N * s_stride + g, mask=w_ok, other=0.0).to(tl.float32)
                zu = tl.load(z_ptr + N * s_stride + g, mask=w_ok, other=0.0).to(tl.float32)
            for i in tl.static_range(8):
                x = tl.load(x_rows + k0 + 4 * i, mask=x_ok, other=0.0)
                w = _dequant_tile(p, p_hi, s, zs, magic, i, x.dtype)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=precision)
                if gated:
                    w = _dequant_tile(pu, pu_hi, su, zu, magic, i, x.dtype)
                    up = tl.dot(x, tl.trans(w), up, input_precision=precision)
        _epilogue(acc, up, b_ptr, y_ptr, rm, rn, m_ok, n_ok, y_cols, ks * M + rm, has_bias, gated)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, q_stride, s_stride, magic, group: tl.constexpr,
                        block_n: tl.constexpr, block_w: tl.constexpr):  # fmt: skip
        """out [N, K] = (q - 8) * scale - zs for a [block_n, block_w] tile of words."""
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        rw = tl.program_id(1) * block_w + tl.arange(0, block_w)
        ok = (rn < N)[:, None] & (rw < K // 8)[None, :]
        rows = rn[:, None].to(tl.int64)
        p = tl.load(q_ptr + rows * q_stride + rw[None, :], mask=ok, other=0)
        g = rows * s_stride + ((rw * 8) // group)[None, :]
        s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
        zs = tl.load(z_ptr + g, mask=ok, other=0.0).to(tl.float32)
        xk = (rw // 4) * 32 + rw % 4
        for i in tl.static_range(8):
            tl.store(out_ptr + rows * K + (xk + 4 * i)[None, :], _dequant_tile(p, _high_half(p), s, zs, magic, i,
                                                                                out_ptr.dtype.element_ty),
                     mask=ok)  # fmt: skip
