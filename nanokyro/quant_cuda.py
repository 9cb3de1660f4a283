"""The CUDA kernels of 4-bit (AWQ) linear layers, on the MMA fragment layout (quant_formats.py): `w4_gemv` for up to
32 rows (decode), `w4_gemm` for more (x's rows staged in shared memory; `w4_wgmma`, the same on Hopper's warpgroup
MMA, on sm_90), `w4_dequantise` (to the model's dtype, for cuBLAS) for prefill chunks. CUDA C++ compiled by
NVRTC (which CUDA builds of torch ship; no CUDA toolkit or headers needed), one module per setting, the first at
load (`available`).

Why not Triton: a one-row int4 GEMV must turn a weight into something a multiply takes in about one instruction,
or the H200's 4.2 TB/s (8.4 G weights a microsecond, 37 a clock on each SM) outruns the instruction issue (every
Triton GEMV tried took 5.4 instructions a weight, docs/PERFORMANCE.md sessions 11-14). Here the weight is the A
operand of the m16n8k16 tensor-core MMA and x its B operand (x's rows padded to a multiple of 8; the tensor cores
have room to spare). Each lane's 32-bit word holds the eight nibbles of its A fragment for one step: per step three
shifts and four lop3s put MAGIC + q in bf16 (or f16) pairs, four fma2s subtract MAGIC + zero exactly, one MMA
sums into fp32, and each group's sums are scaled once. In the sm_90 code that is 16 instructions a word with the
loads, addresses and loop (2 a weight), one 16-byte load per lane per four steps. Measurements:
docs/PERFORMANCE.md, session 24.

The GEMV: a CTA takes one strip of 16 outputs (gated: the gate's strip and the up's), its warps split K in whole
groups and add their sums through shared memory. The launch is PDL's (small_batch.py's rules): the source issues the
first weight loads before the wait, though ptxas may schedule the wait first."""
from __future__ import annotations

import ctypes
import functools
import warnings

import torch

from nanokyro.quant_formats import MMA_MAGIC
from nanokyro.small_batch import use_pdl

MAX_ROWS = 32  # rows the GEMV takes (up to four MMA column tiles of 8)
MAX_WARPS = 16  # 8 from three tiles of x's rows (shared memory, registers)
# Warps a CTA by shape: enough CTAs x warps to keep about this many warps' loads in flight (31 an SM of the H200's
# 132), each warp at least 4 steps of K (session 24's sweep: llama-3.1-8b's gate/up best at 4 warps, down at 16,
# qkv and o at 8)
TARGET_WARPS = 4096
MIN_STEPS = 4
# the GEMM's CTAs (two an SM of the H200's 132) below which they split K as well (session 25's sweep: within 4% of
# the best fixed split for each of llama-3.1-8b's shapes at 33-128 rows)
GEMM_CTAS = 264

WG_STAGES = 4  # w4_wgmma's stages in shared memory (x's rows, the weight words and scale/zero words of a block)
WG_HEIGHTS = (64, 128)  # w4_wgmma's CTA heights (x's rows a CTA): a kernel for each, w4_wgmma64 and w4_wgmma128


def _wgmma_wrappers(sizes: tuple[int, ...] = WG_HEIGHTS) -> str:
    """wgmma<BN>(d, a, desc): one m64nBNk16 warpgroup MMA, A (4 registers) from registers, B from shared memory by
    its descriptor, D += A B in fp32 (BN / 2 registers a thread), written out (an asm operand a register)."""
    out = [f"#define WG_STAGES {WG_STAGES}", "#if WGMMA_ON",
           "template <int BN> __device__ __forceinline__ void wgmma(float* d, const u32* a, unsigned long long desc);"]
    for n in sizes:
        acc = ", ".join(f"%{e}" for e in range(n // 2))
        ops = ", ".join(f'"+f"(d[{e}])' for e in range(n // 2))
        out.append(f"template <> __device__ __forceinline__ void wgmma<{n}>(float* d, const u32* a, "
                   f"unsigned long long desc) {{\n  asm volatile(\"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.\" "
                   f"WG_AB \" {{{acc}}}, {{%{n // 2}, %{n // 2 + 1}, %{n // 2 + 2}, %{n // 2 + 3}}}, %{n // 2 + 4}, "
                   f"1, 1, 1, 0;\"\n    : {ops}\n    : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), "
                   f"\"l\"(desc));\n}}")  # fmt: skip
    return "\n".join(out + ["#endif"])


SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#if F16
#define MAGIC2 0x64006400u  // 1024 in both halves: 1024 + q for a nibble q in the low mantissa bits
#define ONE2 0x3C003C00u
#define MMA_OP "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define FMA2_OP "fma.rn.f16x2"
#define WG_AB "f16.f16"
__device__ __forceinline__ float to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 from_f32(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
#else
#define MAGIC2 0x43004300u  // 128 in both halves (bf16)
#define ONE2 0x3F803F80u
#define MMA_OP "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define FMA2_OP "fma.rn.bf16x2"
#define WG_AB "bf16.bf16"
__device__ __forceinline__ float to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 from_f32(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
#endif

// A's register i of a lane's word: nibbles i and i + 4 as MAGIC + q, minus (MAGIC + zero) of its row: q - zero
__device__ __forceinline__ u32 nibbles(u32 word, int i, u32 negz) {
  u32 a, d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a) : "r"(word >> (4 * i)), "r"(0x000F000Fu), "r"(MAGIC2));
  asm(FMA2_OP " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(ONE2), "r"(negz));
  return d;
}

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
  asm(MMA_OP " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // the weight: read once, keep it out of L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// y [M, N] = x [M, K] @ w.T (+ bias); GATED: w stacks gate and up (2N rows) and y = silu(x @ gate.T) * (x @ up.T),
// each rounded to the dtype first. Block: one strip of 16 outputs, blockDim.x / 32 warps sharing K in whole steps.
// A step is UNIT blocks of 64 features (whole groups); DEPTH steps of weight words are in flight per lane.
#define UNIT (GROUP > 64 ? GROUP / 64 : 1)
#define DEPTH (UNIT >= 4 ? 1 : 4 / UNIT)
#define NS (GATED ? 2 : 1)
extern "C" __global__ void __launch_bounds__(MT > 2 ? 32 * 8 : 32 * 16) w4_gemv(
    const uint4* __restrict__ w, const u32* __restrict__ sz, const u16* __restrict__ x,
    const u16* __restrict__ bias, u16* __restrict__ y, int M, int N, int K, int x_stride, int has_bias) {
  __shared__ float red[MT > 2 ? 8 : 16][NS * MT * 4][32];  // 32 KB at most (the static limit is 48)
  extern __shared__ __align__(16) u32 szs[];  // the strips' scale/zero words, [group][NS][16]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int r = lane >> 2, i = lane & 3;
  const int kblocks = K >> 6, steps = kblocks / UNIT;
  const int u0 = steps * warp / warps, u1 = steps * (warp + 1) / warps;
  const uint4* wp[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) wp[s] = w + (long long)(blockIdx.x + s * (N >> 4)) * kblocks * 32 + lane;
  // every scale/zero word the CTA needs, copied to shared memory before the loop (64 bytes a group and strip): the
  // loop's group starts read them there, not from DRAM (they are read once, so the L2 seldom has them)
  const int gstride = NS * N;  // the weight's rows: one group's scale/zero words
  for (int idx = threadIdx.x; idx < K / GROUP * NS * 4; idx += blockDim.x) {
    const int g = idx / (NS * 4), s = idx / 4 % NS, c = idx % 4;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 ::"r"(shared_address(szs + (g * NS + s) * 16 + 4 * c)),
                   "l"(sz + (long long)g * gstride + (blockIdx.x + s * (N >> 4)) * 16 + 4 * c));
  }
  asm volatile("cp.async.commit_group;");
  // lane's B column: x's row 8t + r (a row past M reads row M - 1: its sums land in columns never stored)
  const u16* xr[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) xr[t] = x + (long long)min(8 * t + r, M - 1) * x_stride + 4 * i;
  float acc[NS][MT][4], part[NS][MT][4], scale[NS][2];
  u32 negz[NS][2];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[s][t][e] = 0.f;

  // running pointers: weight words and x at step u (the loop's first)
  constexpr int GPS = UNIT * 64 / GROUP;  // groups per step
#pragma unroll
  for (int s = 0; s < NS; ++s) wp[s] += (long long)u0 * UNIT * 32;
#pragma unroll
  for (int t = 0; t < MT; ++t) xr[t] += u0 * UNIT * 64;
  uint4 buf[DEPTH][UNIT][NS];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (u0 + d < u1)
#pragma unroll
      for (int b = 0; b < UNIT; ++b)
#pragma unroll
        for (int s = 0; s < NS; ++s) buf[d][b][s] = load_stream(wp[s] + (d * UNIT + b) * 32);
#if PDL  // (small_batch.py's rules: only the weights before the wait)
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();  // the scale/zero words are in
  for (int u = u0; u < u1; u += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      if (u + d >= u1) break;
#pragma unroll
      for (int b = 0; b < UNIT; ++b) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int k0 = b * 64 + 16 * j;  // within the step, which starts a group
          uint2 xv[MT];  // B: x's rows 8t + r, the lane's four features of this MMA
#pragma unroll
          for (int t = 0; t < MT; ++t) xv[t] = *reinterpret_cast<const uint2*>(xr[t] + (d * UNIT + b) * 64 + 16 * j);
          if (k0 % GROUP == 0) {  // a group starts: its scales and zeros for rows r and r + 8, fresh sums
            const int g = (u + d) * GPS + k0 / GROUP;
#pragma unroll
            for (int s = 0; s < NS; ++s) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const u32 v = szs[(g * NS + s) * 16 + r + 8 * h];
                scale[s][h] = to_f32((u16)(v & 0xFFFFu));
                negz[s][h] = __byte_perm(v, 0, 0x3232);  // -(MAGIC + zero) in both halves
              }
#pragma unroll
              for (int t = 0; t < MT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) part[s][t][e] = 0.f;
            }
          }
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            const u32 word = word_of(buf[d][b][s], j);
            u32 a[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) a[q] = nibbles(word, q, negz[s][q & 1]);  // registers 0, 2: row r; 1, 3: r + 8
#pragma unroll
            for (int t = 0; t < MT; ++t) mma(part[s][t], a, xv[t].x, xv[t].y);
          }
          if ((k0 + 16) % GROUP == 0) {  // the group ends: its sums scaled into the totals
#pragma unroll
            for (int s = 0; s < NS; ++s)
#pragma unroll
              for (int t = 0; t < MT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[s][t][e] += scale[s][e >> 1] * part[s][t][e];
          }
        }
      }
      if (u + d + DEPTH < u1)  // this slot's next step
#pragma unroll
        for (int b = 0; b < UNIT; ++b)
#pragma unroll
          for (int s = 0; s < NS; ++s) buf[d][b][s] = load_stream(wp[s] + ((d + DEPTH) * UNIT + b) * 32);
    }
#pragma unroll
    for (int s = 0; s < NS; ++s) wp[s] += DEPTH * UNIT * 32;
#pragma unroll
    for (int t = 0; t < MT; ++t) xr[t] += DEPTH * UNIT * 64;
  }
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp][(s * MT + t) * 4 + e][lane] = acc[s][t][e];
  __syncthreads();
  // lane l's sum e is output row (l >> 2) + 8 (e >> 1) of the strip, x's row 8t + 2 (l & 3) + (e & 1)
  for (int idx = threadIdx.x; idx < MT * 4 * 32; idx += blockDim.x) {
    const int l = idx & 31, e = (idx >> 5) & 3, t = idx >> 7;
    const int m = 8 * t + 2 * (l & 3) + (e & 1), n = blockIdx.x * 16 + (l >> 2) + 8 * (e >> 1);
    if (m >= M) continue;
    float v[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      v[s] = 0.f;
      for (int wi = 0; wi < warps; ++wi) v[s] += red[wi][(s * MT + t) * 4 + e][l];
    }
    float out;
    if (GATED) {
      const float gate = to_f32(from_f32(v[0])), up = to_f32(from_f32(v[NS - 1]));
      out = gate / (1.f + __expf(-gate)) * up;
    } else {
      out = has_bias ? v[0] + to_f32(bias[n]) : v[0];
    }
    y[(long long)m * N + n] = from_f32(out);
  }
}

// y [M, N] = x [M, K] @ w.T (+ bias) for more rows than the GEMV takes: a CTA takes BM of x's rows and 8 strips, a
// warp two of them (its weight words straight from global memory into registers, WD blocks ahead with their groups'
// scale/zero words, dequantised there to A = (q - zero) * scale in the dtype, as w4_dequantise rounds them); x's rows
// stream through shared memory a 64-feature block at a time (STAGES deep, cp.async; rows past M zero-filled), each
// lane's B fragments read from there, 8 bytes a tile and used by both strips' MMAs. With gridDim.z > 1 (few CTAs: a
// small M) the CTAs split K in whole groups and write fp32 partial sums to `part` [gridDim.z, M, N], which the
// caller adds.
#define BM 64
#define XS 80  // a staged row's features: 64, padded so that a B fragment's 8 rows (32 bytes each) start 8 banks apart
#define STAGES 4
#define WS 2  // strips a warp
#define WD 4  // blocks of weight words in flight a lane (a DRAM latency at two CTAs an SM)
#define GPB (GROUP < 64 ? 64 / GROUP : 1)  // groups starting in a block, at most
#define NEG_ZERO2 0x80008000u


extern "C" __global__ void __launch_bounds__(128) w4_gemm(
    const uint4* __restrict__ w, const u32* __restrict__ sz, const u16* __restrict__ x,
    const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ part, int M, int N, int K, int x_stride,
    int has_bias) {
  __shared__ __align__(16) u16 xs[STAGES][BM][XS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, i = lane & 3;
  const int m0 = blockIdx.x * BM, kblocks = K >> 6, strips = N >> 4;
  constexpr int GB = GROUP > 64 ? GROUP / 64 : 1;  // blocks a group: a split's blocks start groups
  const int groups = kblocks / GB, z = blockIdx.z, zs = gridDim.z;
  const int kb0 = groups * z / zs * GB, kb1 = groups * (z + 1) / zs * GB;  // this CTA's blocks
  // x's block kb into a stage: BM rows x 64 features, 16 bytes a copy, BM / 16 a thread (rows past M copy nothing
  // and fill zeros: their sums are never stored); each copy's source row and place in a stage fixed
  constexpr int COPIES = BM * 8 / 128;
  const u16* src[COPIES];
  u32 dst[COPIES], bytes[COPIES];
#pragma unroll
  for (int c = 0; c < COPIES; ++c) {
    const int chunk = threadIdx.x + 128 * c, row = chunk >> 3, col = (chunk & 7) * 8;
    src[c] = x + (long long)(m0 + row < M ? m0 + row : 0) * x_stride + col;
    bytes[c] = m0 + row < M ? 16 : 0;
    dst[c] = shared_address(&xs[0][row][col]);
  }
  auto load_x = [&](int st, int kb) {
#pragma unroll
    for (int c = 0; c < COPIES; ++c)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   ::"r"(dst[c] + st * (BM * XS * 2)), "l"(src[c] + kb * 64), "r"(bytes[c]));
  };
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (kb0 + st < kb1) load_x(st, kb0 + st);
    asm volatile("cp.async.commit_group;");
  }
  // the warp's strips (the last CTA's spare ones read the last strip and store nothing); launched without PDL: the
  // copies above read an earlier kernel's output
  const uint4* wp[WS];
  const u32* szp[WS];
#pragma unroll
  for (int s = 0; s < WS; ++s) {
    const int strip = min(blockIdx.y * 4 * WS + warp * WS + s, strips - 1);
    wp[s] = w + (long long)strip * kblocks * 32 + lane;
    szp[s] = sz + strip * 16 + r;
  }
  // ring slot d: block kb's weight words and the scale/zero words (rows r and r + 8) of the groups starting in it
  uint4 words[WD][WS];
  u32 szw[WD][WS][GPB][2];
#define LOAD_BLOCK(d, kb)                                                             \
  {                                                                                   \
    _Pragma("unroll") for (int s = 0; s < WS; ++s) {                                  \
      words[d][s] = load_stream(wp[s] + (kb) * 32);                                   \
      _Pragma("unroll") for (int g = 0; g < GPB; ++g) {                               \
        const int k = (kb) * 64 + g * (64 / GPB);                                     \
        if (k % GROUP == 0) {                                                         \
          _Pragma("unroll") for (int h = 0; h < 2; ++h)                               \
            szw[d][s][g][h] = szp[s][(long long)(k / GROUP) * N + 8 * h];             \
        }                                                                             \
      }                                                                               \
    }                                                                                 \
  }
#pragma unroll
  for (int d = 0; d < WD; ++d)
    if (kb0 + d < kb1) LOAD_BLOCK(d, kb0 + d)
  float acc[WS][BM / 8][4];
#pragma unroll
  for (int s = 0; s < WS; ++s)
#pragma unroll
    for (int t = 0; t < BM / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[s][t][e] = 0.f;
  u32 scale2[WS][2], negz[WS][2];
  for (int kb = kb0; kb < kb1; kb += WD) {
#pragma unroll
    for (int d = 0; d < WD; ++d) {
      const int kbd = kb + d;
      if (kbd >= kb1) break;
      asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
      // block kbd's x is in shared memory, every thread's copies; every warp is done with block kbd - 1's stage,
      // which the copy below refills
      __syncthreads();
      if (kbd + STAGES - 1 < kb1) load_x((kbd - kb0 + STAGES - 1) % STAGES, kbd + STAGES - 1);
      asm volatile("cp.async.commit_group;");
      const u16(*xb)[XS] = xs[(kbd - kb0) % STAGES];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k0 = kbd * 64 + 16 * j;
        u32 a[WS][4];
#pragma unroll
        for (int s = 0; s < WS; ++s) {
          if (k0 % GROUP == 0) {  // a group starts: scales (in both halves) and zeros for rows r and r + 8
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const u32 v = szw[d][s][GROUP < 64 ? 16 * j / GROUP : 0][h];
              scale2[s][h] = __byte_perm(v, 0, 0x1010);
              negz[s][h] = __byte_perm(v, 0, 0x3232);
            }
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {  // (q - zero) * scale, rounded once to the dtype
            const u32 n4 = nibbles(word_of(words[d][s], j), q, negz[s][q & 1]);
            asm(FMA2_OP " %0, %1, %2, %3;" : "=r"(a[s][q]) : "r"(n4), "r"(scale2[s][q & 1]), "r"(NEG_ZERO2));
          }
        }
#pragma unroll
        for (int t = 0; t < BM / 8; ++t) {
          const uint2 b = *reinterpret_cast<const uint2*>(&xb[8 * t + r][16 * j + 4 * i]);
#pragma unroll
          for (int s = 0; s < WS; ++s) mma(acc[s][t], a[s], b.x, b.y);
        }
      }
      if (kbd + WD < kb1) LOAD_BLOCK(d, kbd + WD)  // this slot's next block
    }
  }
#undef LOAD_BLOCK
  // lane l's sum e of tile t: output row r + 8 (e >> 1) of the strip, x's row m0 + 8t + 2i + (e & 1)
#pragma unroll
  for (int s = 0; s < WS; ++s) {
    const int strip = blockIdx.y * 4 * WS + warp * WS + s;
    if (strip >= strips) break;
    float b[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) b[h] = has_bias && zs == 1 ? to_f32(bias[strip * 16 + r + 8 * h]) : 0.f;
#pragma unroll
    for (int t = 0; t < BM / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * t + 2 * i + (e & 1), n = strip * 16 + r + 8 * (e >> 1);
        if (m >= M) continue;
        if (zs > 1)
          part[((long long)z * M + m) * N + n] = acc[s][t][e];
        else
          y[(long long)m * N + n] = from_f32(acc[s][t][e] + b[e >> 1]);
      }
  }
}

// The same product on Hopper's warpgroup MMA (sm_90a): a CTA takes BN of x's rows and 8 strips, two warpgroups of 4
// warps, a warp one strip. A block's x rows, weight words and scale/zero words come through shared memory together
// (cp.async, WG_STAGES deep); each warp dequantises its strip's A fragments in registers (wgmma's register layout for
// A: a warp 16 of the 64 rows, features in natural order, so the MMA layout's words are shuffled within each quad)
// and x's rows are wgmma's B operand in place (K-major, 128-byte swizzle: a row's 64 features in 128 bytes, its
// 16-byte chunks XOR-permuted by the row's place in its atom of 8): one m64nBNk16 MMA a warpgroup per 16 features in
// place of BN / 8 mma.syncs. A block's A is dequantised once the previous block's MMAs are done (ptxas serialises
// the MMAs when registers they read are written while others are in flight); the SM's other warpgroups keep the
// tensor cores busy meanwhile.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_ON 1
#else
#define WGMMA_ON 0
#endif
WGMMA_WRAPPERS
template <int BN>
__device__ __forceinline__ void w4_wgmma_body(
    const uint4* __restrict__ w, const u32* __restrict__ sz, const u16* __restrict__ x,
    const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ part, int M, int N, int K, int x_stride,
    int has_bias) {
#if WGMMA_ON
  extern __shared__ __align__(128) unsigned char smem[];
  // a stage: x's BN rows x 64 features, then the 8 strips' weight words (a lane's 16 bytes each), then the scale/zero
  // words of the block's groups for the CTA's 128 outputs (the group holding the block's first feature when groups
  // span blocks)
  constexpr int X_BYTES = BN * 128, W_BYTES = 8 * 32 * 16, SZ_BYTES = GPB * 128 * 4;
  constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + SZ_BYTES + 1023) / 1024 * 1024, CP = BN / 32;  // (x's copies)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, i = lane & 3;
  const int m0 = blockIdx.x * BN, n0 = blockIdx.y * 128, kblocks = K >> 6, strips = N >> 4;
  constexpr int GB = GROUP > 64 ? GROUP / 64 : 1;
  const int groups = kblocks / GB, z = blockIdx.z, zs = gridDim.z;
  const int kb0 = groups * z / zs * GB, kb1 = groups * (z + 1) / zs * GB;
  // stages from a 1024-byte boundary (the 128-byte swizzle's atom: 8 rows of 128 bytes)
  const u32 raw = shared_address(smem), base = (raw + 1023) & ~1023u;
  unsigned char* const stages = smem + (base - raw);
  // x's copy idx: a row's 16-byte chunk (a warp 4 whole rows), at chunk ^ (row % 8) of its 128-byte row in the stage
  // (wgmma's 128-byte swizzle, which spreads a core matrix's 8 rows over the banks); rows past M fill zeros
  const u16* src[CP];
  u32 dst[CP], bytes[CP];
#pragma unroll
  for (int c = 0; c < CP; ++c) {
    const int idx = threadIdx.x + 256 * c, row = idx >> 3, chunk = idx & 7;
    src[c] = x + (long long)(m0 + row < M ? m0 + row : 0) * x_stride + chunk * 8;
    bytes[c] = m0 + row < M ? 16 : 0;
    dst[c] = base + row * 128 + ((chunk ^ (row & 7)) << 4);
  }
  // the warp's strip (spare warps of the last CTA read the last strip and store nothing): its lane's word a block;
  // threads below 32 * GPB copy 16 bytes of a group's scale/zero words (outputs past N fill zeros)
  const int strip = min(blockIdx.y * 8 + warp, strips - 1);
  const uint4* wp = w + (long long)strip * kblocks * 32 + lane;
  const u32 wdst = base + X_BYTES + threadIdx.x * 16;
  const int zg = threadIdx.x >> 5, zn = n0 + lane * 4;
  const u32* zsrc = sz + min(zn, N - 4) + (long long)(GROUP < 64 ? zg : 0) * N;
  const u32 zdst = base + X_BYTES + W_BYTES + threadIdx.x * 16, zbytes = zn < N ? 16 : 0;
  auto load_stage = [&](int st, int kb) {
    const u32 off = st * STAGE_BYTES;
#pragma unroll
    for (int c = 0; c < CP; ++c)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   ::"r"(dst[c] + off), "l"(src[c] + kb * 64), "r"(bytes[c]));
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(wdst + off), "l"(wp + kb * 32));
    if (threadIdx.x < 32 * GPB)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   ::"r"(zdst + off), "l"(zsrc + (long long)(kb * 64 / GROUP) * N), "r"(zbytes));
  };
#pragma unroll
  for (int st = 0; st < WG_STAGES - 1; ++st) {
    if (kb0 + st < kb1) load_stage(st, kb0 + st);
    asm volatile("cp.async.commit_group;");
  }
  // B's descriptor: start >> 4, leading offset 1 (unused by a K-major swizzled B), stride (8-row atoms) 1024 bytes,
  // the 128-byte swizzle (1 in bits 62-63); a 16-feature step starts 32 bytes further into the rows
  const unsigned long long desc0 = ((base & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
                                   (1ull << 62);  // fmt: skip
  float acc[BN / 2];
#pragma unroll
  for (int e = 0; e < BN / 2; ++e) acc[e] = 0.f;
  u32 a[4][4], scale2[2], negz[2];
  for (int kb = kb0; kb < kb1; ++kb) {
    const int st = (kb - kb0) % WG_STAGES;
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");  // block kb - 1's MMAs are done
    asm volatile("cp.async.wait_group %0;" ::"n"(WG_STAGES - 2));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // this thread's copies, seen by the MMAs' proxy
    __syncthreads();  // block kb's stage is in shared memory; no warpgroup still reads block kb - 1's
    if (kb + WG_STAGES - 1 < kb1) load_stage((kb - kb0 + WG_STAGES - 1) % WG_STAGES, kb + WG_STAGES - 1);
    asm volatile("cp.async.commit_group;");
    const unsigned char* stage = stages + st * STAGE_BYTES;
    const uint4 words = reinterpret_cast<const uint4*>(stage + X_BYTES)[threadIdx.x];
    const u32* szs = reinterpret_cast<const u32*>(stage + X_BYTES + W_BYTES) + (warp * 16 + r);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // block kb's A fragments
      if ((kb * 64 + 16 * j) % GROUP == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const u32 v = szs[(GROUP < 64 ? 16 * j / GROUP : 0) * 128 + 8 * h];
          scale2[h] = __byte_perm(v, 0, 0x1010);
          negz[h] = __byte_perm(v, 0, 0x3232);
        }
      }
      // wgmma pairs A's features with B's in their natural order (a lane's registers 0, 1: features 2i, 2i + 1; 2,
      // 3: 2i + 8, 2i + 9), while the MMA layout gives a lane features 4i to 4i + 3 (mma.sync's B is loaded four
      // features at a time): features 2i, 2i + 1 are in lane i / 2 of the quad, 2i + 8, 2i + 9 in lane 2 + i / 2,
      // their registers 0, 1 for an even i and 2, 3 (two nibbles up) for an odd one
      const u32 word = word_of(words, j), quad = lane & ~3, up = 8 * (i & 1);
      const u32 lo = __shfl_sync(0xFFFFFFFFu, word, quad | (i >> 1)) >> up;
      const u32 hi = __shfl_sync(0xFFFFFFFFu, word, quad | (2 + (i >> 1))) >> up;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const u32 n4 = nibbles(q < 2 ? lo : hi, q & 1, negz[q & 1]);
        asm(FMA2_OP " %0, %1, %2, %3;" : "=r"(a[j][q]) : "r"(n4), "r"(scale2[q & 1]), "r"(NEG_ZERO2));
      }
    }
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    const unsigned long long desc = desc0 + (st * STAGE_BYTES >> 4);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma<BN>(acc, a[j], desc + j * (32 >> 4));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  if (blockIdx.y * 8 + warp >= strips) return;
  float b[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) b[h] = has_bias && zs == 1 ? to_f32(bias[strip * 16 + r + 8 * h]) : 0.f;
  // lane l's sum 4c + e: output row r + 8 (e >> 1) of the strip, x's row m0 + 8c + 2i + (e & 1)
#pragma unroll
  for (int c = 0; c < BN / 8; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = m0 + 8 * c + 2 * i + (e & 1), n = strip * 16 + r + 8 * (e >> 1);
      if (m >= M) continue;
      if (zs > 1)
        part[((long long)z * M + m) * N + n] = acc[4 * c + e];
      else
        y[(long long)m * N + n] = from_f32(acc[4 * c + e] + b[e >> 1]);
    }
#endif
}

#define W4_WGMMA(BN)                                                                                            \
  extern "C" __global__ void __launch_bounds__(256, 2) w4_wgmma##BN(                                              \
      const uint4* __restrict__ w, const u32* __restrict__ sz, const u16* __restrict__ x,                     \
      const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ part, int M, int N, int K,        \
      int x_stride, int has_bias) {                                                                            \
    w4_wgmma_body<BN>(w, sz, x, bias, y, part, M, N, K, x_stride, has_bias);                                   \
  }
WGMMA_KERNELS

// out [N, K] = (q - zero) * scale in the dtype; a thread per lane word group (strip, 64-feature block, lane)
extern "C" __global__ void w4_dequantise(const uint4* __restrict__ w, const u32* __restrict__ sz,
                                         u16* __restrict__ out, int N, int K) {
  const int kblocks = K >> 6;
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = idx & 31;
  const long blk = idx >> 5;
  const int strip = blk / kblocks, kb = blk % kblocks;
  if (strip >= (N >> 4)) return;
  const int r = lane >> 2, i = lane & 3;
  const uint4 v = w[blk * 32 + lane];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = kb * 64 + 16 * j;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows r and r + 8: registers h (features 0, 1) and h + 2 (features 2, 3)
      const int n = strip * 16 + r + 8 * h;
      const u32 s = sz[(long long)(k / GROUP) * N + n];
      const float scale = to_f32((u16)(s & 0xFFFFu));
      const u32 negz = __byte_perm(s, 0, 0x3232);
      const u32 p01 = nibbles(word_of(v, j), h, negz), p23 = nibbles(word_of(v, j), h + 2, negz);
      uint2 o;
      o.x = pack2(to_f32((u16)(p01 & 0xFFFFu)) * scale, to_f32((u16)(p01 >> 16)) * scale);
      o.y = pack2(to_f32((u16)(p23 & 0xFFFFu)) * scale, to_f32((u16)(p23 >> 16)) * scale);
      *reinterpret_cast<uint2*>(out + (long long)n * K + k + 4 * i) = o;
    }
  }
}
""".replace("WGMMA_WRAPPERS", _wgmma_wrappers()).replace(
    "WGMMA_KERNELS", "\n".join(f"W4_WGMMA({n})" for n in WG_HEIGHTS))


class _LaunchConfig(ctypes.Structure):  # the driver's CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]  # fmt: skip


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """NVRTC, which CUDA builds of torch load (from its nvidia-cuda-nvrtc wheel or the system's)."""
    major = (torch.version.cuda or "13").split(".")[0]
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("the int4 MMA kernels need NVRTC (libnvrtc), which CUDA builds of torch ship")


def compile_cubin(defines: dict, arch: str, nvrtc: ctypes.CDLL | None = None) -> bytes:
    """SOURCE compiled by NVRTC with `defines` for `arch` (e.g. "sm_90"): the cubin. No headers: the source
    needs none."""
    lib = nvrtc or _nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"quant_cuda.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    options = [f"--gpu-architecture={arch}", "-std=c++17"] + [f"-D{k}={v}" for k, v in defines.items()]
    size = ctypes.c_size_t()
    try:
        if lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*map(str.encode, options))):
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed on quant_cuda.SOURCE with {defines}:\n{log.value.decode()}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _module(device: torch.device, dtype: torch.dtype, group: int, rows_tiles: int, gated: bool,
            pdl: bool) -> ctypes.c_void_p:  # fmt: skip
    """SOURCE (all its kernels) compiled for `dtype`, `group`, the GEMV's x row tiles of 8, gating and PDL, for
    `device`, and loaded into its context: the CUmodule."""
    major, minor = torch.cuda.get_device_capability(device)
    defines = dict(F16=int(dtype == torch.float16), GROUP=group, MT=rows_tiles, GATED=int(gated), PDL=int(pdl))
    cubin = compile_cubin(defines, f"sm_{major}{minor}{'a' if wgmma_available(device) else ''}")  # (a: wgmma)
    module = ctypes.c_void_p()
    with torch.cuda.device(device):  # the module loads into the current context
        if _driver().cuModuleLoadData(ctypes.byref(module), cubin):
            raise RuntimeError(f"could not load quant_cuda's module ({defines})")
    return module


@functools.cache
def _kernel(device: torch.device, name: str, dtype: torch.dtype, group: int, rows_tiles: int = 1,
            gated: bool = False, pdl: bool = False) -> ctypes.c_void_p:  # fmt: skip
    """The CUfunction `name` of _module's module for these settings."""
    func = ctypes.c_void_p()
    if _driver().cuModuleGetFunction(ctypes.byref(func), _module(device, dtype, group, rows_tiles, gated, pdl),
                                     name.encode()):  # fmt: skip
        raise RuntimeError(f"no kernel {name} in quant_cuda's module")
    return func


def _shared_kernel(device: torch.device, name: str, dtype: torch.dtype, group: int) -> ctypes.c_void_p:
    """`name` from the one-tile GEMV's module, which `available` builds at load: the GEMM and dequantise kernels
    share it (its row-tile, gating and PDL defines do not touch them), so they cost no compile of their own."""
    return _kernel(device, name, dtype, group, 1, False, use_pdl())


def _launch(func: ctypes.c_void_p, grid: int | tuple[int, ...], threads: int, args: list, pdl: bool,
            shared: int = 0) -> None:  # fmt: skip
    """One launch on the current stream of args[0]'s device (PDL: programmatic stream serialization; `shared`
    bytes of dynamic shared memory); args are tensors (pointers) and ints (int32)."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attr = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    gx, gy, gz = (*grid, 1, 1)[:3] if isinstance(grid, tuple) else (grid, 1, 1)
    config = _LaunchConfig((gx, gy, gz), (threads, 1, 1), shared, torch.cuda.current_stream(args[0].device).cuda_stream,
                           ctypes.cast(ctypes.byref(attr), ctypes.c_void_p) if pdl else None, int(pdl))  # fmt: skip
    err = _driver().cuLaunchKernelEx(ctypes.byref(config), func, pointers, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {err}")


@functools.cache
def available(device: torch.device, dtype: torch.dtype, group: int) -> bool:
    """Whether the kernels build and load for `device` (NVRTC found, the architecture taken): tried at load, once
    a setting, so that a layer keeps the Triton kernels' layout rather than failing at its first step."""
    try:
        for name in ("w4_gemv", "w4_gemm", "w4_dequantise"):
            _shared_kernel(device, name, dtype, group)
        if wgmma_available(device):
            for bn in WG_HEIGHTS:
                _wgmma_kernel(device, bn, dtype, group)
        return True
    except (OSError, RuntimeError) as e:
        warnings.warn(f"int4 layers keep the Triton kernels: quant_cuda's kernels did not build ({e})", stacklevel=2)
        return False


def gemv_warps(ctas: int, steps: int) -> int:
    """The GEMV's warps a CTA for `ctas` strips and `steps` steps of K: a power of two, 1 to MAX_WARPS."""
    want = min(MAX_WARPS, TARGET_WARPS // ctas, steps // MIN_STEPS)
    return 1 << max(0, want.bit_length() - 1) if want > 1 else 1


def _check(dtype: torch.dtype) -> None:
    if dtype not in MMA_MAGIC:
        raise ValueError(f"the int4 MMA kernels take bf16 or fp16 activations, not {dtype}")


GEMV_MAX_SZ_SHARED = 160 * 1024  # w4_gemv's scale/zero words in shared memory, at most (K / group * 64 a strip)


@functools.cache
def _gemv_kernel(device: torch.device, dtype: torch.dtype, group: int, tiles: int, gated: bool,
                 pdl: bool) -> ctypes.c_void_p:  # fmt: skip
    """w4_gemv of _module's module for these settings, allowed its scale/zero words' dynamic shared memory."""
    func = _kernel(device, "w4_gemv", dtype, group, tiles, gated, pdl)
    if _driver().cuFuncSetAttribute(func, _MAX_DYNAMIC_SHARED, GEMV_MAX_SZ_SHARED):
        raise RuntimeError("could not give w4_gemv its shared memory")
    return func


def w4_gemv(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, bias: torch.Tensor | None,
            gated: bool, warps: int | None = None) -> torch.Tensor:  # fmt: skip
    """x [M <= MAX_ROWS, K] @ w.T (+ bias) for w in the MMA layout (packed [N/16, K/64, 32, 4], sz [K/g, N]);
    `gated`: w stacks gate and up, y = silu(x @ gate.T) * (x @ up.T). `warps` overrides gemv_warps (the sweep)."""
    _check(x.dtype)
    assert bias is None or not gated, "gated: no bias"
    M, K = x.shape
    assert M <= MAX_ROWS and packed.shape[1] * 64 == K
    if x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:  # (x's 8-byte loads; contiguous() may not copy)
        x = x.clone(memory_format=torch.contiguous_format)
    assert not gated or packed.shape[0] % 2 == 0, "gated: gate and up in whole strips each"
    N = packed.shape[0] * 16 // (2 if gated else 1)
    tiles = -(-M // 8)
    warps = min(warps or gemv_warps(N // 16, K // max(64, group)), MAX_WARPS if tiles <= 2 else 8)
    y = x.new_empty(M, N)
    if M == 0:
        return y
    pdl = use_pdl()
    func = _gemv_kernel(x.device, x.dtype, group, tiles, gated, pdl)
    shared = K // group * (2 if gated else 1) * 64  # (the strips' scale/zero words)
    assert sz.is_contiguous() and sz.data_ptr() % 16 == 0 and shared <= GEMV_MAX_SZ_SHARED
    _launch(func, N // 16, 32 * warps, [packed, sz, x, bias if bias is not None else y, y, M, N, K, x.stride(0),
                                        int(bias is not None)], pdl, shared)  # fmt: skip
    return y


def w4_gemm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, bias: torch.Tensor | None,
            splits: int | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ w.T (+ bias) for w in the MMA layout, many rows: CTAs of 64 rows by 128 outputs (not gated: the
    caller applies silu(gate) * up to the stacked product). Where that makes fewer than GEMM_CTAS CTAs, they also
    split K (`splits` overrides), their fp32 partial sums added here."""
    _check(x.dtype)
    return _gemm(_shared_kernel(x.device, "w4_gemm", x.dtype, group), 128, 0, 64, x, packed, sz, group, bias, splits)


def _gemm(func: ctypes.c_void_p, threads: int, shared: int, rows: int, x: torch.Tensor, packed: torch.Tensor,
          sz: torch.Tensor, group: int, bias: torch.Tensor | None, splits: int | None) -> torch.Tensor:  # fmt: skip
    """One of the GEMM kernels on x [M, K] in CTAs of `rows` rows by 128 outputs, K split as w4_gemm says."""
    M, K = x.shape
    assert packed.shape[1] * 64 == K
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # (x's 16-byte copies)
        x = x.clone(memory_format=torch.contiguous_format)
    N = packed.shape[0] * 16
    y = x.new_empty(M, N)
    if M == 0:
        return y
    grid = (-(-M // rows), -(-N // 128))
    groups = K // max(64, group)
    splits = min(splits or max(1, GEMM_CTAS // (grid[0] * grid[1])), groups)  # (split only to at least double them)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    args = [packed, sz, x, bias if bias is not None else y, y, part, M, N, K, x.stride(0), int(bias is not None)]
    _launch(func, (*grid, splits), threads, args, False, shared)
    if splits == 1:
        return y
    y = part.sum(0)
    return (y if bias is None else y + bias).to(x.dtype)


_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@functools.cache
def wgmma_available(device: torch.device) -> bool:
    """The warpgroup-MMA GEMM runs on sm_90 (the module is built for sm_90a there)."""
    return torch.cuda.get_device_capability(device) == (9, 0)


def _wgmma_shared(bn: int, group: int) -> int:
    """w4_wgmma's shared memory: WG_STAGES stages of x's bn rows (128 bytes each), 8 strips' weight words (512
    bytes each) and the block's groups' scale/zero words for 128 outputs, each stage on a 1024-byte boundary (the
    swizzle's), and 1024 bytes to align the first."""
    return WG_STAGES * -(-(bn * 128 + 8 * 512 + max(1, 64 // group) * 128 * 4) // 1024) * 1024 + 1024


@functools.cache
def _wgmma_kernel(device: torch.device, bn: int, dtype: torch.dtype, group: int) -> ctypes.c_void_p:
    """w4_wgmma<bn> of the one-tile GEMV's module, allowed its dynamic shared memory (past the 48 KB default)."""
    func = _shared_kernel(device, f"w4_wgmma{bn}", dtype, group)
    if _driver().cuFuncSetAttribute(func, _MAX_DYNAMIC_SHARED, _wgmma_shared(bn, group)):
        raise RuntimeError(f"could not give w4_wgmma{bn} its shared memory")
    return func


def w4_wgmma(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, bias: torch.Tensor | None,
             splits: int | None = None, bn: int | None = None) -> torch.Tensor:  # fmt: skip
    """w4_gemm's product on Hopper's warpgroup MMA (sm_90): CTAs of `bn` rows (64 up to 64 rows, else 128) by 128
    outputs, K split as w4_gemm splits it."""
    _check(x.dtype)
    bn = bn or (64 if x.shape[0] <= 64 else 128)
    func = _wgmma_kernel(x.device, bn, x.dtype, group)
    return _gemm(func, 256, _wgmma_shared(bn, group), bn, x, packed, sz, group, bias, splits)


def w4_dequantise(packed: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The MMA layout -> w [N, K] in `dtype`."""
    _check(dtype)
    strips, kblocks = packed.shape[:2]
    out = torch.empty(strips * 16, kblocks * 64, dtype=dtype, device=packed.device)
    threads = strips * kblocks * 32
    func = _shared_kernel(packed.device, "w4_dequantise", dtype, group)
    _launch(func, (threads + 255) // 256, 256, [packed, sz, out, strips * 16, kblocks * 64], False)
    return out
