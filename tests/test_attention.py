"""Attention's Triton kernels on the CPU, run by Triton's interpreter against the torch reference: the one- and
two-row decode graphs' RoPE + KV write (attention.triton_rope_write_kv) against RotaryEmbedding then write_kv; and
that only a backend that rotates in its KV write is handed q and k unrotated. (The GPU tests compare the FlashInfer
backend with the torch one.)"""
import torch

from conftest import run_in_interpreter
from nanokyro import LLM, SamplingParams, small_batch
from nanokyro.attention import FlashInferAttention

# The head of both interpreter checks below
INTERPRETER_ROUNDING = r"""
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from nanokyro.attention import rope_write_kv, triton_rope_write_kv, write_kv
from nanokyro.layers import RotaryEmbedding
from nanokyro.quant_formats import FP8, FP8_MAX

# The interpreter truncates fp32 to bf16, and rounding to fp8 it drops the carry into the exponent (31.5 becomes
# 16); CUDA rounds both to nearest even, as torch does. Its conversions from fp32 made torch's, the kernel's
# stores can be compared bit for bit.
convert = interpreter._convert_float
ROUNDED = {tl.bfloat16: (torch.bfloat16, torch.int16), tl.float8e4nv: (FP8, torch.uint8)}


def rounded_as_cuda(x, x_dtype, dtype, rounding_mode):
    if x_dtype != tl.float32 or dtype not in ROUNDED:
        return convert(x, x_dtype, dtype, rounding_mode)
    to, bits = ROUNDED[dtype]
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(to).view(bits).numpy()


interpreter._convert_float = rounded_as_cuda

"""

ROPE_WRITE_CHECK = INTERPRETER_ROUNDING + r"""
gen = torch.Generator().manual_seed(0)
fused = triton_rope_write_kv()
PAGES, PAGE = 6, 16
cases = 0
# (q heads, kv heads, head_dim): llama-3.1-8b's, and a small one with D 64; one or two tokens, in other pages or
# in one, the first at the table's last position; the qkv projection's strided views, or contiguous heads as the
# qk-norm leaves them.
for H, HKV, D, pages, offsets, positions, strided in (
    (32, 8, 128, [5, 2], [15, 3], [4095, 17], True),
    (4, 2, 64, [2, 2], [7, 8], [4095, 4094], False),
):
    rope = RotaryEmbedding(D, 4096, 500000.0, None)
    for T in (1, 2):
        for act in (torch.float32, torch.bfloat16):
            for cache_dtype in (act, FP8):
                cache = (torch.randn(PAGES, 2, PAGE, HKV, D, generator=gen) * 100).to(cache_dtype)
                qkv = torch.randn(T, (H + 2 * HKV) * D, generator=gen) * 100
                qkv[:, 1::4] *= 10  # a quarter of q, k and v far past fp8's 448: an fp8 cache clamps them
                q, k, v = (x.view(T, -1, D) for x in qkv.to(act).split([H * D, HKV * D, HKV * D], -1))
                if not strided:
                    q, k = q.contiguous(), k.contiguous()
                i32 = lambda x: torch.tensor(x[:T], dtype=torch.int32)
                want, got = cache.clone(), cache.clone()
                want_q, want_k = rope(i32(positions), q, k)
                assert (want_k.abs() > FP8_MAX).any() and (v.abs() > FP8_MAX).any()  # the clamp has work
                write_kv(want, want_k, v, i32(pages), i32(offsets))
                got_q = fused(got, q, k, v, i32(pages), i32(offsets), i32(positions), rope.cos_sin)
                assert got_q.shape == (T, H, D) and got_q.is_contiguous() and got_q.dtype == act
                slots = torch.zeros(PAGES, PAGE, dtype=torch.bool)
                slots[i32(pages).long(), i32(offsets).long()] = True
                by_slot = lambda kv: kv.view(torch.uint8).transpose(1, 2)  # [pages, page, k/v, heads, bytes]
                assert torch.equal(by_slot(got)[~slots], by_slot(cache)[~slots])  # nothing else written
                assert torch.equal(got_q, want_q), (H, D, T, act, cache_dtype)
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (H, D, T, act, cache_dtype)
                cases += 1
# A table the kernel would misread is refused on the host: rows not D apart, and fp16.
pages, offsets, positions = (torch.tensor([1], dtype=torch.int32) for _ in range(3))
for table in (torch.cat([rope.cos_sin, rope.cos_sin], 1)[:, :D], rope.cos_sin.half()):
    try:
        fused(cache.clone(), q[:1], k[:1], v[:1], pages, offsets, positions, table)
    except AssertionError:
        cases += 1
print(cases)
"""


def test_rope_kv_write_kernel_matches_rope_then_write_in_the_interpreter():
    """One kernel for the small decode graphs' RoPE and KV write returns the q and stores the k and v that
    RotaryEmbedding then write_kv give, bit for bit, from fp32 and bf16 activations, into a cache of their dtype
    and an fp8 one (k and v past its 448 clamped, as many are); q comes back contiguous, and no other slot is
    written. A cos/sin table that the kernel would misread (strided rows, fp16) is refused before the launch."""
    assert run_in_interpreter(ROPE_WRITE_CHECK) == "18"


DECODE_CHECK = INTERPRETER_ROUNDING + r"""
import torch.nn.functional as F

from nanokyro.decode_attention import DecodeAttention, num_splits

gen = torch.Generator().manual_seed(0)
PAGES, PAGE, D = 48, 16, 64
rope = RotaryEmbedding(D, 4096, 10000.0, None)
worst, cases = 0.0, 0
# (q heads, KV heads): groups of 4, 1 and 3 query heads a KV head (3: padded to the dot's 16 rows like the others)
for H, HKV in ((8, 2), (4, 4), (6, 2)):
    for cache_dtype in (torch.float16, FP8):  # (the interpreter's dot misreads bf16, so the activations are fp16)
        cache = torch.randn(PAGES, 2, PAGE, HKV, D, generator=gen).to(cache_dtype)
        # one row: under a page, a page, past one, many; two rows of unequal length
        for lens in ([1], [16], [17], [300], [5, 200], [64, 65]):
            B, counts = len(lens), [-(-n // PAGE) for n in lens]
            pages = torch.randperm(PAGES, generator=gen)[: sum(counts)].to(torch.int32)  # scattered pages
            indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
            last = torch.tensor([n - (c - 1) * PAGE for n, c in zip(lens, counts)], dtype=torch.int32)
            slot_pages, slot_offsets = pages[indptr[1:].long() - 1], last - 1  # the new token: each row's last
            positions = torch.tensor(lens, dtype=torch.int32) - 1
            # q, k and v as strided views of a qkv projection; a quarter of k and v past fp8's 448, which an fp8
            # cache clamps
            qkv = torch.randn(B, (H + 2 * HKV) * D, generator=gen)
            qkv[:, H * D + 1 :: 4] *= 1000
            q, k, v = (x.view(B, -1, D) for x in qkv.half().split([H * D, HKV * D, HKV * D], -1))
            for rotate in (False, True):
                want_cache = cache.clone()
                if rotate:
                    want_q = rope_write_kv(want_cache, q, k, v, slot_pages, slot_offsets, positions, rope.cos_sin)
                else:
                    want_q = q
                    write_kv(want_cache, k, v, slot_pages, slot_offsets)
                want = []
                for b, n in enumerate(lens):
                    kv = want_cache[pages[indptr[b] : indptr[b + 1]].long()].float()  # [pages, 2, page, HKV, D]
                    keys, values = (kv[:, i].reshape(-1, HKV, D)[:n].transpose(0, 1) for i in (0, 1))
                    want.append(F.scaled_dot_product_attention(want_q[b, :, None].float(), keys, values,
                                                               enable_gqa=True)[:, 0])  # fmt: skip
                want = torch.stack(want)
                for splits in (1, 5) if rotate else (5,):  # one split; several, some of them empty (short rows)
                    attend = DecodeAttention(B, H, HKV, D, torch.device("cpu"), splits)
                    for _ in range(2):  # the counters go back to 0 for the next call
                        got_cache = cache.clone()
                        got = attend(q, k, v, got_cache, slot_pages, slot_offsets, indptr, pages, last,
                                     *((positions, rope.cos_sin) if rotate else ()))  # fmt: skip
                        assert got.shape == q.shape and got.dtype == q.dtype
                        # the new k and v written as the separate ops write them, and nothing else
                        assert torch.equal(got_cache.view(torch.uint8), want_cache.view(torch.uint8)), (lens, rotate)
                        worst = max(worst, ((got.float() - want).norm() / want.norm()).item())
                        assert not attend.counts.any()
                    cases += 1
assert num_splits(1, 8, 132) == 33 and num_splits(2, 8, 132) == 16 and num_splits(1, 1, 132) == 64
assert worst < 5e-3, worst
print(cases)
"""


def test_decode_attention_kernel_matches_sdpa_in_the_interpreter():
    """The one- and two-row graphs' decode attention (one kernel: the new k and v written, rotated with q by RoPE
    or not; split-KV, the last program merging) writes the cache bit for bit as RoPE then write_kv do, and gives
    SDPA's output over each row's scattered pages: 1 to 300 tokens, groups of 4, 1 and 3 query heads a KV head, an
    fp16 and an fp8 cache (k and v past its range clamped), 1 or 5 splits (some of them empty), q, k and v as
    strided views. Its counters are back to 0 after every call."""
    assert run_in_interpreter(DECODE_CHECK, timeout=600) == str(3 * 2 * 6 * 3)


def test_only_a_backend_that_rotates_in_its_kv_write_is_handed_q_and_k_unrotated(llama_dir, monkeypatch):
    """Where the small decode graphs move RoPE into the KV write (small_batch's switch on), the torch backend still
    gets q and k rotated by RotaryEmbedding, and gives the same logits; FlashInfer's backend, and its bound op
    that the compiled graphs call, would get them unrotated."""
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=16 << 20)
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request([5], SamplingParams(max_tokens=1))  # one token: a one-row step
    logits = []
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(engine.scheduler.schedule())
        for switch_on in (False, True):
            if switch_on:  # RoPE's test of the switch only (q [T, H, D]); linear layers and norms keep the CPU's
                monkeypatch.setattr(small_batch, "on", lambda x: x.dim() == 3)
            runner.attn.plan(meta)
            logits.append(runner.model.compute_logits(runner.model(input_ids, positions, runner.attn)))
    assert torch.equal(logits[0], logits[1])
    engine.fail_all()
    rope, q = runner.model.rope, torch.zeros(1, 4, 16)
    assert small_batch.on(q) and not rope.in_kv_write(q, runner.attn)
    flashinfer = object.__new__(FlashInferAttention)  # (not built: that needs CUDA)
    assert rope.in_kv_write(q, flashinfer) and rope.in_kv_write(q, flashinfer.op)
