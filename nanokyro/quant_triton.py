"""The Triton kernels of the quantised linear layers (quant.py's ops call them on CUDA; the CPU runs them only
under TRITON_INTERPRET=1, in the tests): `qgemv` reads an FP8 or 4-bit packed weight once and dequantises it in
registers (GEMVs for a few rows, tensor-core tiles above, settings by row count in GEMV_CONFIG), and single
kernels that quantise activations per row to FP8, apply a W8A8 product's scales, and dequantise int4 weights in
the rows layout for cuBLAS (int4 layers in the MMA layout take quant_cuda.py's kernels instead)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from nanokyro.quant_formats import FP8, fp8_group
from nanokyro.small_batch import MAX_ROWS, pdl_launch, triton_interprets, use_pdl


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
    # fp8_row_kernel: the weight read as 32-bit words of four fp8 values, converted by inline PTX (fp8_words_sum);
    # CUDA and bf16 x only (the interpreter, other dtypes and unaligned inputs take fp8_rows_sum)
    words: bool = False
    # Tiles, FP8 per-channel: the dot in f16 (x clamped to f16's range), not x's dtype. fp8 to f16 is one
    # instruction per two values on sm_89+; to bf16 Triton adds one more per value (two, through fp32, in older
    # versions).
    f16: bool = False


C = GemvConfig
# By rows, from the H200 sweeps in docs/PERFORMANCE.md (`python -m nanokyro.benchmarks.quant_kernels`, llama-3.1-8b's
# projections). FP8 per-channel up to 16 rows takes a setting per kind of layer (gate/up; down, K > 8192; the
# rest): GEMVs at one row, and at two for all but gate/up; otherwise tensor-core tiles with the dot in f16 (session
# 10: 1.10-1.19x the bf16-dot tiles at 2-16 rows), split four ways along K where not gated. Block-wise FP8 keeps the
# one-row GEMV it was tested with and the bf16-dot tiles. The int4 settings are untuned: int4 on CUDA takes the MMA
# layout (quant_cuda.py) wherever it applies.
F16_TILE = C(16, 64, 128, 4, True, 3, f16=True)
FP8_CHANNEL_CONFIG = {
    1: {"gated": C(1, 16, 2048, 4, False), "long": C(1, 8, 1024, 4, False, prefetch=True),
        None: C(1, 16, 512, 4, False, prefetch=True)},
    2: {"gated": F16_TILE, None: C(2, 8, 2048, 4, False)},
    16: {"gated": F16_TILE, None: F16_TILE._replace(split_k=4)},
}  # fmt: skip
# FP8 per-channel, one row, bf16 x on CUDA: the weight read as words (session 12: 63.2 us a llama-3.1-8b layer
# against 79.9 for the settings above, which other dtypes and the interpreter keep)
FP8_WORDS_CONFIG = C(1, 4, 2048, 4, False, vec=8, words=True)
GEMV_CONFIG = {
    "fp8": {1: C(1, 4, 2048, 4, False), 16: C(16, 32, 256, 4, True, 3), 64: C(64, 64, 128, 4, True, 3),
            None: C(128, 128, 128, 8, True, 3)},
    "int4": {1: C(1, 4, 2048, 4, False), 4: C(4, 4, 512, 4, False), 16: C(16, 32, 256, 4, True, 3),
             64: C(64, 64, 256, 4, True, 3), None: C(128, 128, 256, 8, True, 3)},
}  # fmt: skip


def gemv_config(M: int, K: int, int4: bool, per_row: bool, gated: bool) -> GemvConfig:
    """The setting for an [M, K] input (tables above)."""
    rows = next((r for r in FP8_CHANNEL_CONFIG if r >= M), None)  # the first key >= M, as below
    if per_row and rows is not None:
        by_kind = FP8_CHANNEL_CONFIG[rows]
        return by_kind.get("gated" if gated else "long" if K > 8192 else None, by_kind[None])
    configs = GEMV_CONFIG["int4" if int4 else "fp8"]
    return configs[next((r for r in configs if r and r >= M), None)]


def qgemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None,
          bias: torch.Tensor | None, gated: bool, config: GemvConfig | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] against fp8 `weight` [N, K] (zeros None) or int4 `weight` [N, K/8] with `zeros`, both with
    `scale` [N, groups]: one Triton kernel that dequantises the packed weight in registers. `config` overrides
    GEMV_CONFIG's entry (the benchmark's sweep)."""
    import triton

    assert bias is None or not gated, "gated: the kernels add a bias to the gate half only, not [gate; up]'s 2N"
    M, K = x.shape
    int4 = zeros is not None
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    per_row = not int4 and scale.shape[1] == 1
    group = K // scale.shape[1] if int4 else fp8_group(K, scale.shape[1])
    x = x if x.stride(1) == 1 else x.contiguous()
    one_row = M == 1 and per_row and not int4
    words = one_row and _words_apply(x, weight)
    config = config or (FP8_WORDS_CONFIG if words else gemv_config(M, K, int4, per_row, gated))
    if config.vec and one_row:
        return _fp8_row(x, weight, scale, bias, gated, config, config.words and words)
    block_m, block_n, block_k, num_warps, use_dot, num_stages, split, prefetch, reduce_once = config[:9]
    f16 = config.f16 and use_dot and per_row and not int4
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
    y = x.new_empty(M, N) if split == 1 else x.new_empty(split * M, N, dtype=torch.float32)
    pdl = M <= MAX_ROWS and use_pdl()  # (PDL in small_batch.py)
    qgemv_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m), triton.cdiv(K, k_split))](
        x, weight, scale, zeros if int4 else scale, bias if bias is not None and split == 1 else scale, y, M, N, K,
        k_split, x.stride(0), weight.stride(0), scale.stride(0), y.stride(0), int4=int4, per_row=per_row,
        group=group, has_bias=bias is not None and split == 1, gated=gated, use_dot=use_dot, prefetch=prefetch,
        reduce_once=reduce_once, f16=f16, block_m=block_m, block_n=block_n, block_k=block_k, pdl=pdl,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(pdl),
    )  # fmt: skip
    if split == 1:
        return y
    y = y.view(-1, M, N).sum(0)
    return (y if bias is None else y + bias).to(x.dtype)


def _fp8_row(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, gated: bool,
             config: GemvConfig, words: bool) -> torch.Tensor:  # fmt: skip
    """One row against fp8 `weight` [N, K] with per-row scales [N, 1]: fp8_row_kernel (`words`: reading the
    weight as words, where _words_apply allows it)."""
    import triton

    K = x.shape[1]
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    block_n = max(config.block_n // 2, 1) if gated else config.block_n
    block_k = min(config.block_k, triton.next_power_of_2(K))
    y, pdl = x.new_empty(1, N), use_pdl()  # (PDL in small_batch.py)
    fp8_row_kernel[(triton.cdiv(N, block_n),)](
        x, weight, scale, bias if bias is not None else scale, y, N, K, weight.stride(0), scale.stride(0),
        has_bias=bias is not None, gated=gated, x_2d=config.x_2d, vec=config.vec, block_n=block_n, block_k=block_k,
        words=words, pdl=pdl, num_warps=config.num_warps, num_stages=1, **pdl_launch(pdl),
    )  # fmt: skip
    return y


def _words_apply(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_row_kernel can read `weight` as int32 words and x as int64 words (inline PTX: not in the
    interpreter; bf16 x; whole, aligned words)."""
    return (not triton_interprets() and x.dtype == torch.bfloat16 and x.shape[1] % 4 == 0
            and weight.stride(0) % 4 == 0 and weight.data_ptr() % 4 == 0 and x.data_ptr() % 8 == 0)  # fmt: skip


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


def scale_outer_cuda(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                     dtype: torch.dtype, block_n: int = 1024) -> torch.Tensor:  # fmt: skip
    """acc [M, N] fp32 * row_scale [M, 1] * col_scale [N, 1].T -> `dtype`, one kernel: a W8A8 product's per-token
    and per-channel scales applied after a GEMM that ran with unit scales (quant._scaled_mm_fp8's tensorwise)."""
    import triton

    m, n = acc.shape
    acc, row_scale, col_scale = acc.contiguous(), row_scale.reshape(m).contiguous(), col_scale.reshape(n).contiguous()
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    _scale_outer_kernel[(triton.cdiv(n, block_n), m)](acc, row_scale, col_scale, out, n, block_n=block_n)
    return out


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
                           block_k: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """One row's x @ w.T over input features [k_lo, k_hi) of fp8 rows, unscaled, fp32 [1, block_n]: the next
        tile's load is issued before this tile's products, so two tiles per program are in flight. `reduce_once`:
        products summed elementwise over the steps and across lanes at the end (no shuffles or barrier per step).
        `pdl`: the PDL wait comes after the first tile's load."""
        rk = k_lo + tl.arange(0, block_k)
        w_next = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < k_hi)[None, :], other=0.0,
                         eviction_policy="evict_first")  # fmt: skip
        if pdl:  # the first tile's load is in flight; x is an earlier kernel's (PDL in small_batch.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
                     reduce_once: tl.constexpr, f16: tl.constexpr, block_m: tl.constexpr, block_n: tl.constexpr,
                     block_k: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """y = x @ w.T (+ b); `gated`: w is [gate; up], 2N rows, and y = silu(x @ gate.T) * (x @ up.T). Program
        (., ., s) sums input features [s k_split, (s + 1) k_split) into rows s M.. of y (one split: all of them).
        `pdl`: the PDL wait comes first, but after the first weight tile's load where the GEMV prefetches."""
        if pdl and not prefetch:  # (PDL in small_batch.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
            acc += fp8_row_prefetched(x_ptr, w_rows, k_lo, k_hi, n_ok, reduce_once, block_n, block_k, pdl)
            if gated:  # (waited already, in the gate rows' pass)
                up += fp8_row_prefetched(x_ptr, w_rows + N * w_stride, k_lo, k_hi, n_ok, reduce_once, block_n,
                                         block_k, False)  # fmt: skip
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
                elif f16:  # partial() then takes the weight to f16 as well
                    x = tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
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
                     block_k: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """sum over K of x * w for fp8 rows w_rows [block_n, 1] (pointers), fp32 [block_n]. Pointers advance by a
        tile per step and the next tile's load is issued before this one's products; products are summed
        elementwise and across lanes once at the end. Weight loads of `vec` bytes match x's 16-byte bf16 loads
        (vec 8) so both sit in one register layout, with no shuffle through shared memory per step. `pdl`: the
        PDL wait comes after the first tile's load."""
        cols = tl.max_contiguous(tl.arange(0, block_k), vec)[None, :]
        w_ptrs = w_rows + cols
        if x_2d:
            x_ptrs = x_ptr + cols + tl.zeros((block_n, 1), tl.int32)
        else:
            x_ptrs = x_ptr + cols
        w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < K), other=0.0, eviction_policy="evict_first")
        if pdl:  # the first tile's load is in flight; x is an earlier kernel's (PDL in small_batch.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
    def fp8_word_to_f32(w):
        """Four fp8 e4m3 values in an int32 word (the first in the low byte) to four fp32: cvt e4m3x2 to f16x2 on
        each half, then f16 to f32 (exact: every e4m3 value is an f16)."""
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h, a0, a1, b0, b1; .reg .b32 a, b;\n"
            "mov.b32 {l, h}, $4; cvt.rn.f16x2.e4m3x2 a, l; cvt.rn.f16x2.e4m3x2 b, h;\n"
            "mov.b32 {a0, a1}, a; mov.b32 {b0, b1}, b;\n"
            "cvt.f32.f16 $0, a0; cvt.f32.f16 $1, a1; cvt.f32.f16 $2, b0; cvt.f32.f16 $3, b1; }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def fp8_words_sum(x_ptr, w_rows, K, n_ok, vec: tl.constexpr, block_n: tl.constexpr, block_k: tl.constexpr,
                      pdl: tl.constexpr):  # fmt: skip
        """fp8_rows_sum reading the weight as int32 words (four fp8) and x as int64 words (four bf16), `vec`
        bytes of weight per lane: Triton 3.6 converts fp8 tensors byte by byte (a PRMT to unpack each byte and
        more to pack the pairs again for cvt, about 2 instructions a weight); here each word takes two cvt and
        four f16 to f32, and x's four values are shifts of its word. K % 4 == 0; rows 4-byte, x 8-byte aligned.
        `pdl` as fp8_rows_sum."""
        cols = tl.max_contiguous(tl.arange(0, block_k // 4), vec // 4)[None, :]
        w_ptrs = w_rows.to(tl.pointer_type(tl.int32), bitcast=True) + cols
        x_ptrs = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + cols
        k4 = K // 4
        w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < k4), other=0, eviction_policy="evict_first")
        if pdl:  # the first tile's load is in flight; x is an earlier kernel's (PDL in small_batch.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((block_n, block_k // 4), tl.float32)
        for k0 in range(0, k4, block_k // 4):
            w = w_next
            w_ptrs += block_k // 4
            w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < k4 - k0 - block_k // 4), other=0,
                             eviction_policy="evict_first")  # fmt: skip
            xw = tl.load(x_ptrs, mask=cols < k4 - k0, other=0)
            x_ptrs += block_k // 4
            x0 = (xw << 16).to(tl.int32).to(tl.float32, bitcast=True)  # bf16 to fp32: its bits, shifted up
            x1 = (xw.to(tl.int32) & -65536).to(tl.float32, bitcast=True)
            x2 = ((xw >> 16).to(tl.int32) & -65536).to(tl.float32, bitcast=True)
            x3 = ((xw >> 32).to(tl.int32) & -65536).to(tl.float32, bitcast=True)
            w0, w1, w2, w3 = fp8_word_to_f32(w)
            acc = (((acc + x0 * w0) + x1 * w1) + x2 * w2) + x3 * w3  # four FMAs, no separate sum
        return tl.sum(acc, 1)

    @triton.jit
    def fp8_row_sum(x_ptr, w_rows, K, n_ok, words: tl.constexpr, x_2d: tl.constexpr, vec: tl.constexpr,
                    block_n: tl.constexpr, block_k: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """One row's unscaled products with fp8 rows [block_n]: read as words, or as fp8 tensors."""
        if words:
            return fp8_words_sum(x_ptr, w_rows, K, n_ok, vec, block_n, block_k, pdl)
        return fp8_rows_sum(x_ptr, w_rows, K, n_ok, x_2d, vec, block_n, block_k, pdl)

    @triton.jit
    def fp8_row_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, w_stride, s_stride, has_bias: tl.constexpr,
                       gated: tl.constexpr, x_2d: tl.constexpr, vec: tl.constexpr, block_n: tl.constexpr,
                       block_k: tl.constexpr, words: tl.constexpr, pdl: tl.constexpr):  # fmt: skip
        """y [1, N] = x [1, K] @ (w * scale).T (+ b) for fp8 w with per-row scales; `gated` as qgemv_kernel.
        `pdl`: the PDL wait comes after the first weight tile's load."""
        rn = tl.program_id(0) * block_n + tl.arange(0, block_n)
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None].to(tl.int64) * w_stride
        acc = fp8_row_sum(x_ptr, w_rows, K, n_ok, words, x_2d, vec, block_n, block_k, pdl)
        acc *= tl.load(s_ptr + rn * s_stride, mask=n_ok, other=0.0)
        if has_bias:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if gated:  # (waited already, in the gate rows' pass)
            up = fp8_row_sum(x_ptr, w_rows + N * w_stride, K, n_ok, words, x_2d, vec, block_n, block_k, False)
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
    def _scale_outer_kernel(acc_ptr, r_ptr, c_ptr, out_ptr, N, block_n: tl.constexpr):
        """Row m of acc, block_n columns at a time, times its row's scale and each column's (all contiguous)."""
        row = tl.program_id(1)
        cols = tl.program_id(0) * block_n + tl.arange(0, block_n)
        acc = tl.load(acc_ptr + row * N + cols, mask=cols < N, other=0.0)
        y = acc * tl.load(r_ptr + row) * tl.load(c_ptr + cols, mask=cols < N, other=0.0)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=cols < N)

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
