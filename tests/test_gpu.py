"""CUDA only (`pytest -m gpu`): FlashInfer against the torch reference on the same paged inputs, the engine end to
end in bf16, and the decode CUDA graphs (replay equals the compiled step, padding stays out, graphs ~ eager)."""
from __future__ import annotations

import gc
import logging

import pytest
import torch

from nanokyro import LLM, SamplingParams
from nanokyro.attention import AttentionMetadata, FlashInferAttention, TorchAttention
from nanokyro.scheduler import ScheduledBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DEVICE = "cuda"
PAGE = 16
H, HKV, D = 16, 8, 128  # qwen3-0.6b's heads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_meta(seq_pages: list[list[int]], q_lens: list[int], kv_lens: list[int]) -> AttentionMetadata:
    """Metadata for sequences whose pages are given; the last q_len of each kv_len tokens are this step's."""
    slot_pages, slot_offsets, indices, kv_indptr = [], [], [], [0]
    for pages, q, n in zip(seq_pages, q_lens, kv_lens):
        used = (n + PAGE - 1) // PAGE
        slot_pages += [pages[p // PAGE] for p in range(n - q, n)]
        slot_offsets += [p % PAGE for p in range(n - q, n)]
        indices += pages[:used]
        kv_indptr.append(kv_indptr[-1] + used)
    qo_indptr = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(
        kv_indices=torch.tensor(indices, **i32), slot_pages=torch.tensor(slot_pages, **i32),
        slot_offsets=torch.tensor(slot_offsets, **i32), q_lens=q_lens, kv_lens=kv_lens,
        qo_indptr=qo_indptr.pin_memory(), kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32).pin_memory(),
        kv_last_page_len=torch.tensor([(n - 1) % PAGE + 1 for n in kv_lens], dtype=torch.int32).pin_memory(),
    )  # fmt: skip


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_triton_kv_write_equals_indexing(kv_dtype):
    """The CUDA KV write kernel stores exactly what indexing stores, from strided k/v views as the model passes;
    into an fp8 cache, rounded and clamped as attention.stored does (some k past fp8's 448)."""
    from nanokyro.attention import triton_write_kv, write_kv

    gen = torch.Generator(DEVICE).manual_seed(0)
    cache = torch.randn(12, 2, PAGE, HKV, D, generator=gen, device=DEVICE, dtype=torch.bfloat16).to(kv_dtype)
    qkv = torch.randn(7, (H + 2 * HKV) * D, generator=gen, device=DEVICE, dtype=torch.bfloat16) * 100
    qkv[0, H * D : H * D + 4], qkv[1, -4:] = 1000, -1000  # past fp8's range in k and in v
    k, v = (x.view(7, HKV, D) for x in qkv[:, H * D :].split(HKV * D, dim=-1))  # strided views, like the model's
    pages = torch.tensor([3, 3, 7, 0, 11, 11, 5], dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor([0, 15, 4, 9, 1, 2, 15], dtype=torch.int32, device=DEVICE)
    want, got = cache.clone(), cache.clone()
    write_kv(want, k, v, pages, offsets)
    triton_write_kv()(got, k, v, pages, offsets)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 2])
def test_rope_kv_write_kernel_matches_rope_then_write(kv_dtype, tokens):
    """The small decode graphs' one kernel for RoPE and the KV write, from strided q/k/v views like the model's
    (many values past fp8's 448, which an fp8 cache clamps): the q and k of RotaryEmbedding within one rounding
    step (the kernel's fp32 products may be fused into FMAs; the interpreter test in test_attention.py holds it to
    the bit), the same v bytes, and no other slot written."""
    from nanokyro.attention import triton_rope_write_kv, write_kv
    from nanokyro.layers import RotaryEmbedding

    gen = torch.Generator(DEVICE).manual_seed(tokens)
    rope = RotaryEmbedding(D, 4096, 1e6, None).to(DEVICE)
    cache = torch.randn(12, 2, PAGE, HKV, D, generator=gen, device=DEVICE, dtype=torch.bfloat16).to(kv_dtype)
    qkv = torch.randn(tokens, (H + 2 * HKV) * D, generator=gen, device=DEVICE, dtype=torch.bfloat16) * 100
    qkv[:, 1::4] *= 10  # a quarter of q, k and v far past fp8's 448: an fp8 cache clamps them
    q, k, v = (x.view(tokens, -1, D) for x in qkv.split([H * D, HKV * D, HKV * D], dim=-1))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    positions = torch.tensor([4095, 1000][:tokens], **i32)
    pages, offsets = torch.tensor([11, 3][:tokens], **i32), torch.tensor([15, 0][:tokens], **i32)
    want, got = cache.clone(), cache.clone()
    want_q, want_k = rope(positions, q, k)
    write_kv(want, want_k, v, pages, offsets)
    got_q = triton_rope_write_kv()(got, q, k, v, pages, offsets, positions, rope.cos_sin)
    def within_a_step(a: torch.Tensor, b: torch.Tensor, bits: int) -> bool:
        """a within one rounding step of b, for `bits` of mantissa; or 2**-9 apart (fp8's subnormal step, and a
        few fp32 steps of the products where they cancel)."""
        a, b = a.float(), b.float()
        return bool(((a - b).abs() <= b.abs() * 2.0 ** (1 - bits) + 2.0**-9).all())

    assert within_a_step(got_q, want_q, 8)
    got, want = got.view(torch.uint8), want.view(torch.uint8)  # (torch indexes fp8 as bytes)
    got_k, want_k = (x[pages, 0, offsets].view(kv_dtype) for x in (got, want))
    assert within_a_step(got_k, want_k, 8 if kv_dtype == torch.bfloat16 else 4)
    assert torch.equal(got[pages, 1, offsets], want[pages, 1, offsets])  # v
    got[pages, :, offsets], want[pages, :, offsets] = 0, 0
    assert torch.equal(got, want)  # no other slot written


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("kind", ["plain", "bias", "gated"])
def test_gemv_matches_fp32_matmul(rows, kind):
    """The one/two-row GEMV against an fp32 matmul, on shapes that leave partial blocks in both dimensions and a
    row view with a stride (what a gathered row looks like); 3 rows fall back to cuBLAS, which matches too.
    `gated` is the MLP's silu(x @ gate.T) * (x @ up.T) from the stacked weight, in one kernel."""
    from nanokyro.small_batch import gemv

    gen = torch.Generator(DEVICE).manual_seed(rows)
    for n, k in [(4096, 14336), (6150, 4096), (37, 1000)]:
        n_rows = 2 * n if kind == "gated" else n
        w = torch.randn(n_rows, k, generator=gen, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        x = torch.randn(rows, 2 * k, generator=gen, device=DEVICE, dtype=torch.bfloat16)[:, :k]
        b = torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16) if kind == "bias" else None
        want = x.float() @ w.float().T + (b.float() if b is not None else 0)
        if kind == "gated":
            want = torch.nn.functional.silu(want[:, :n]) * want[:, n:]
        got = gemv(x, w, b, gated=kind == "gated")
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        assert rel_err(got.float(), want) < 1e-2, (n, k)


@pytest.mark.parametrize("residual", [False, True])
def test_one_kernel_rms_norm_matches_the_model_norm(residual):
    from nanokyro.layers import RMSNorm
    from nanokyro.small_batch import rms_norm

    gen = torch.Generator(DEVICE).manual_seed(0)
    norm = RMSNorm(4096, 1e-5).to(DEVICE, torch.bfloat16)
    norm.weight.data = torch.randn(4096, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(2, 8192, generator=gen, device=DEVICE, dtype=torch.bfloat16)[:, 4096:]  # rows with a stride
    r = torch.randn(2, 4096, generator=gen, device=DEVICE, dtype=torch.bfloat16) if residual else None
    want, got = norm(x, r), rms_norm(x, r, norm.weight, norm.eps)
    if residual:
        assert torch.equal(got[1], want[1])  # the new residual: the same bf16 sum
        want, got = want[0], got[0]
    assert rel_err(got.float(), want.float()) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_of_a_few_rows_is_torchs(dtype):
    """sampler.argmax's Triton path (a few rows, a large vocabulary) against torch's argmax, ties and all."""
    from nanokyro.sampler import ARGMAX_CHUNK, argmax, chunked_argmax

    gen = torch.Generator(DEVICE).manual_seed(0)
    V = 128256
    logits = torch.randn(8, V, generator=gen, device=DEVICE).to(dtype)
    logits[1, [5, 3 * ARGMAX_CHUNK + 2, V - 1]] = 60.0  # a tie across chunks: the first wins
    logits[2, :] = float("-inf")
    logits[2, V - 1] = 0.0  # in the partial last chunk
    logits[3, :] = 1.0
    logits[4, [2 * ARGMAX_CHUNK + 1, V - 3]] = float("nan")  # NaN is the largest: the first one
    logits[5, :] = float("nan")
    for rows in (1, 2, 8):  # (argmax takes the Triton kernels up to 8 rows; chunked_argmax always does)
        want = logits[:rows].argmax(-1)
        assert torch.equal(argmax(logits[:rows]), want) and torch.equal(chunked_argmax(logits[:rows]), want), rows
    assert argmax(logits[1:2]).item() == 5 and argmax(logits[5:6]).item() == 0


CASES = {
    # name: (pages of each sequence, new tokens, tokens in cache after the step)
    "prefill": ([[3, 7, 1], [0], [9, 2, 4, 5]], [40, 5, 64], [40, 5, 64]),
    "decode": ([[3, 7, 1], [0], [9, 2, 4, 5]], [1, 1, 1], [37, 16, 50]),
    "mixed": ([[3, 7, 1], [0], [9, 2, 4, 5]], [1, 9, 30], [33, 12, 60]),  # a decode, a first chunk, a later chunk
    # Sequences 0 and 1 share their first two (full) pages, as prefix caching or n > 1 leaves them.
    "shared_pages": ([[3, 7, 1], [3, 7, 6], [3, 7]], [1, 4, 1], [40, 36, 20]),
}


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_flashinfer_matches_torch_attention(case, kv_dtype):
    """bf16 queries against a bf16 cache, and against an fp8 one (kv_cache_dtype="fp8": both backends read the
    same fp8 values; the Triton KV write rounds k and v as attention.stored does)."""
    seq_pages, q_lens, kv_lens = CASES[case]
    gen = torch.Generator(DEVICE).manual_seed(0)
    cache = torch.randn(2, 12, 2, PAGE, HKV, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)  # [L, P, 2, ...]
    cache = cache.to(kv_dtype)
    T = sum(q_lens)
    q = torch.randn(T, H, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(T, HKV, D, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    meta = make_meta(seq_pages, q_lens, kv_lens)
    outs, caches = [], []
    for backend in (TorchAttention, FlashInferAttention):
        kv = cache.clone()
        attn = TorchAttention(kv, H, D) if backend is TorchAttention else backend(kv, H, D, torch.bfloat16)
        attn.plan(meta)
        outs.append(attn(1, q, k, v))
        caches.append(kv)
    ref, out = outs
    assert out.shape == ref.shape == (T, H, D)
    assert rel_err(out, ref) < 1e-2
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))  # the same slots, same values


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


DUMMY = dict(load_format="dummy", dtype="bfloat16", kv_cache_memory=1 << 30, max_num_seqs=8)


def qwen3(**kw) -> LLM:
    return LLM("qwen3-0.6b", **{**DUMMY, **kw})


@pytest.fixture(scope="module")
def graph_llm():
    llm = qwen3()
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.buckets == [1, 2, 4, 8]
    yield llm
    del llm
    free_cuda()


def record_logits(llm: LLM) -> list[torch.Tensor]:
    """Make the engine's sampler keep a copy of each step's logits [rows, vocab]."""
    seen, sampler = [], llm.engine.runner.sampler

    class Recording:
        def sample(self, logits, rows):
            seen.append(logits.clone())
            return sampler.sample(logits, rows)

    llm.engine.runner.sampler = Recording()
    return seen


def test_engine_serves_dummy_qwen3_and_matches_torch_backend(graph_llm):
    """A 64-token greedy run through FlashInfer and the decode graphs; the torch backend, fed the same tokens,
    gives the same logits at every step within bf16 tolerance."""
    prompt = torch.randint(0, 151936, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = graph_llm.engine.runner
    sampler = runner.sampler
    seen = record_logits(graph_llm)
    out = graph_llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    runner.sampler = sampler
    assert len(out.token_ids) == 64 and out.finish_reason == "length"
    got = torch.cat(seen)  # [64, vocab]: the prefill's last row, then 63 decode steps
    assert torch.equal(got.argmax(-1).cpu(), torch.tensor(out.token_ids))

    ref_llm = qwen3(attention_backend="torch", enforce_eager=True)
    engine = ref_llm.engine
    engine.add_request(prompt + out.token_ids[:-1], SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    runner = engine.runner
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(batch)
        runner.attn.plan(meta)
        ref = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn))[len(prompt) - 1 :].float()
    engine.fail_all()
    del ref_llm, engine, runner
    free_cuda()
    assert rel_err(got, ref) < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9  # near-ties in random weights may flip a few


def decoding_batch(llm: LLM, n: int) -> ScheduledBatch:
    """n sequences past their prefill, as a one-token-each decode batch (not stepped: reusable)."""
    engine = llm.engine
    vocab = engine.runner.model_cfg.vocab_size
    prompts = torch.randint(0, vocab, (n, 20), generator=torch.Generator().manual_seed(n)).tolist()
    for i, p in enumerate(prompts):
        engine.add_request(p[: 5 + 3 * i], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()  # all prefills
    engine.finish_in_flight()
    batch = engine.scheduler.schedule()
    assert batch.num_new == [1] * n
    return batch


@torch.inference_mode()
def test_graph_replay_equals_compiled_step_bit_for_bit(graph_llm):
    runner = graph_llm.engine.runner
    graphs = runner.graphs
    batch = decoding_batch(graph_llm, 8)
    for bucket in graphs.buckets:
        sub = ScheduledBatch(batch.seqs[:bucket], batch.num_new[:bucket])
        inputs = runner.prepare(sub, pad_to=bucket)[:3]
        graphs.load(*inputs)
        compiled = graphs.forward(graphs.input_ids[:bucket], graphs.positions[:bucket]).clone()
        replayed = graphs.replay(graphs.load(*inputs)).clone()
        assert torch.equal(replayed, compiled), bucket
    graph_llm.engine.fail_all()


@torch.inference_mode()
def test_padding_never_reaches_outputs(graph_llm):
    runner = graph_llm.engine.runner
    graphs = runner.graphs
    batch = decoding_batch(graph_llm, 5)  # padded to bucket 8
    assert graphs.bucket(batch) == 8
    kv_before = runner.kv_cache.clone()
    inputs = runner.prepare(batch, pad_to=8)[:3]
    clean = graphs.replay(graphs.load(*inputs))[:5].clone()
    graphs.load(*inputs)
    graphs.input_ids[5:8] = torch.randint(0, 151936, (3,), device=DEVICE, dtype=torch.int32)  # poison the padding
    graphs.positions[5:8] = torch.randint(0, 1000, (3,), device=DEVICE, dtype=torch.int32)
    graphs.graphs[8].replay()
    assert torch.equal(graphs.logits[8][:5], clean)
    # Only the batch's new slots and the scratch page changed in the cache.
    changed = (runner.kv_cache != kv_before).any(-1).any(-1).any(2).any(0)  # [pages, page_size]
    expected = torch.zeros_like(changed)
    for seq in batch.seqs:
        p = seq.num_computed
        expected[seq.pages[p // PAGE], p % PAGE] = True
    expected[runner.scratch_page] = changed[runner.scratch_page]
    assert torch.equal(changed, expected)
    out = runner.run(batch)
    assert len(out.token_ids) == 5
    graph_llm.engine.fail_all()


@pytest.fixture(scope="module")
def llama_graph_llm():
    """llama-3.2-1b's shapes (D 64): no q/k norms, so q and k reach the KV write as strided views of the qkv
    projection's output, where qwen3's norms leave them contiguous."""
    llm = LLM("llama-3.2-1b", **DUMMY)
    assert llm.engine.runner.graphs is not None
    yield llm
    del llm
    free_cuda()


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("model", ["qwen3", "llama"])
@torch.inference_mode()
def test_small_graphs_rotating_in_the_kv_write_match_eager(request, model, rows):
    """The one- and two-row graphs rotate q and k in the KV write's kernel (RotaryEmbedding.in_kv_write): a replay
    runs rope_kv_kernel once a layer. Their logits and the k and v they store match the eager step's (RoPE, then
    the write), after qwen3's q/k norms and from llama's strided q and k."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    llm = request.getfixturevalue("graph_llm" if model == "qwen3" else "llama_graph_llm")
    runner = llm.engine.runner
    batch = decoding_batch(llm, rows)
    slots = [(s.pages[s.num_computed // PAGE], s.num_computed % PAGE) for s in batch.seqs]
    pages, offsets = (torch.tensor(x, device=DEVICE) for x in zip(*slots))
    input_ids, positions, meta, out_rows = runner.prepare(batch, pad_to=rows)
    runner.graphs.load(input_ids, positions, meta)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graphed = runner.graphs.replay(rows)[out_rows].float()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert sum(name.startswith("rope_kv_kernel") for name in kernels) == len(runner.model.layers), sorted(set(kernels))
    graphed_kv = runner.kv_cache[:, pages, :, offsets].float()  # [rows, layers, k/v, Hkv, D]
    input_ids, positions, meta, out_rows = runner.prepare(batch)
    runner.attn.plan(meta)
    eager = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn)[out_rows]).float()
    assert rel_err(graphed, eager) < 2e-2
    assert rel_err(graphed_kv, runner.kv_cache[:, pages, :, offsets].float()) < 2e-2
    llm.engine.fail_all()


@torch.inference_mode()
def test_graphs_match_eager_logits(graph_llm):
    runner = graph_llm.engine.runner
    batch = decoding_batch(graph_llm, 6)
    input_ids, positions, meta, rows = runner.prepare(batch, pad_to=8)
    graphed = runner.graphs.replay(runner.graphs.load(input_ids, positions, meta))[rows].float()
    input_ids, positions, meta, rows = runner.prepare(batch)
    runner.attn.plan(meta)
    eager = runner.model.compute_logits(runner.model(input_ids, positions, runner.attn)[rows]).float()
    # The compiled forward keeps fused intermediates in fp32 where eager rounds each op to bf16.
    assert rel_err(graphed, eager) < 2e-2
    graph_llm.engine.fail_all()


def test_overlapped_steps_match_serial_steps(graph_llm):
    """On the GPU the host really runs a step behind the device: same tokens as with one step at a time."""
    engine = graph_llm.engine
    prompts = torch.randint(0, 151936, (6, 40), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [p[: 4 + 7 * i] for i, p in enumerate(prompts)]
    params = [SamplingParams(max_tokens=10 + 5 * i, temperature=0 if i % 2 else 0.9, seed=i, ignore_eos=True)
              for i in range(6)]  # fmt: skip
    runs = {}
    for overlap in (False, True):
        engine.cfg.overlap_schedule = overlap
        engine.cache.clear()  # a cached prefix would take other kernels, whose rounding may flip near-ties
        runs[overlap] = [o.token_ids for o in graph_llm.generate(prompts, params)]
    assert runs[True] == runs[False]
    assert not engine.has_work() and engine.blocks.all_free()


def test_constrained_decoding_on_cuda(tmp_path):
    """xgrammar's masks applied to CUDA logits, in a batch with unconstrained rows that stay unchanged."""
    import json
    import re

    from conftest import save_tokenizer
    from nanokyro import StructuredOutput

    free_cuda()
    save_tokenizer(str(tmp_path))  # a small real tokenizer over the dummy model's larger vocab
    llm = qwen3(tokenizer=str(tmp_path), enforce_eager=True)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate([[11, 12, 13]], plain)[0].token_ids
    regex = SamplingParams(max_tokens=20, temperature=1.0, seed=0, structured=StructuredOutput(regex="[0-9]{3}-[a-z]{2}"))
    obj = SamplingParams(max_tokens=60, temperature=1.0, seed=1,
                         structured=StructuredOutput(json={"type": "object", "properties": {"k": {"enum": ["x", "y"]}},
                                                           "required": ["k"]}))  # fmt: skip
    outs = llm.generate([[1, 2, 3], [11, 12, 13], [4, 5, 6]], [regex, plain, obj])
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", outs[0].text)
    assert outs[1].token_ids == alone
    assert json.loads(outs[2].text)["k"] in ("x", "y")
    del llm
    free_cuda()



def assert_greedy_runs_agree(a, b, tol: float = 0.05) -> None:
    """Two greedy runs of the same prompts (with top-5 logprobs) agree: at every position the tokens both runs
    list get the same logprobs within `tol`, and the same token is chosen, until a position where the two
    choices are a near-tie in both runs (bf16 sums in another order flip ties; the dummy models' logits are
    nearly flat, so ties are common). After such a flip the sequence's inputs differ, and it is compared no
    further. A wrong hidden state or KV moves the logprobs far more than `tol`."""
    for oa, ob in zip(a, b):
        assert len(oa.logprobs) == len(ob.logprobs) > 0
        for la, lb in zip(oa.logprobs, ob.logprobs):
            da, db = dict(la.top), dict(lb.top)
            common = da.keys() & db.keys()
            assert common and max(abs(da[t] - db[t]) for t in common) < tol
            if la.token_id != lb.token_id:
                assert da[la.token_id] - da.get(lb.token_id, float("-inf")) < tol
                assert db[lb.token_id] - db.get(la.token_id, float("-inf")) < tol
                break


def test_fp8_kv_cache_with_graphs_matches_the_torch_backend_reading_it():
    """kv_cache_dtype="fp8" on CUDA: FlashInfer reading fp8 pages (decode graphs, the Triton KV write rounding k
    and v) gives the greedy tokens and top logprobs of the torch backend reading the same kind of cache. The
    prompts end at different steps, so the decodes run the four-row graph and then the two- and one-row ones,
    whose KV write also rotates k (RotaryEmbedding.in_kv_write)."""
    prompts = torch.randint(0, 151936, (4, 40), generator=torch.Generator().manual_seed(7)).tolist()
    params = [SamplingParams(max_tokens=4 + 4 * i, temperature=0, ignore_eos=True, logprobs=5) for i in range(4)]
    runs = []
    for backend in ("flashinfer", "torch"):
        free_cuda()
        llm = qwen3(kv_cache_dtype="fp8", attention_backend=backend)
        assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
        assert (llm.engine.runner.graphs is not None) == (backend == "flashinfer")
        runs.append(llm.generate(prompts, params))
        del llm
    free_cuda()
    assert_greedy_runs_agree(*runs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_gpus_match_one(graph_llm, tp, pp, caplog):
    """TP=2 (NCCL all-reduces inside the compiled forward and the decode graphs) and PP=2 (each stage's decode
    graphs, a step per stage in flight): each prompt's greedy tokens and top logprobs match one GPU's, up to
    near-ties flipped by bf16 sums in another order. The prompts end at different steps, so the decodes run the
    four-row graph and then the two- and one-row ones (at TP=2, their o and down GEMVs send their parts:
    RowParallelLinear.part). Rank 0's groups go at once (parallel.destroy_groups warns when they outlast its
    timeout, and leaves the world initialised): PP=2 closed, TP=2 dropped unclosed as a script that ends without
    close() (bench.py), where the runner's finalizer must drop the graphs first."""
    prompts = torch.randint(0, 151936, (4, 40), generator=torch.Generator().manual_seed(5)).tolist()
    params = [SamplingParams(max_tokens=4 + 4 * i, temperature=0, ignore_eos=True, logprobs=5) for i in range(4)]
    graph_llm.engine.cache.clear()
    one = graph_llm.generate(prompts, params)
    llm = qwen3(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert llm.engine.runner.graphs is not None
        two = llm.generate(prompts, params)
    except BaseException:
        llm.close()
        raise
    with caplog.at_level(logging.WARNING, logger="nanokyro.parallel"):
        if tp == 2:
            del llm
            gc.collect()
        else:
            llm.close()
    assert "did not go" not in caplog.text
    assert not torch.distributed.is_initialized()  # gone, not left to the process's exit
    assert_greedy_runs_agree(one, two)
    free_cuda()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_pipeline_stage_graphs_give_eager_stages_logits():
    """PP=2 with each stage's decode graphs (the stage before's hidden states received into a static buffer, the
    next stage's sent from one) gives the greedy tokens and top logprobs of PP=2 run eagerly, up to bf16
    near-ties; two steps in flight at a time in both."""
    prompts = torch.randint(0, 151936, (4, 40), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    runs = []
    for eager in (True, False):
        llm = qwen3(pipeline_parallel_size=2, enforce_eager=eager)
        try:
            assert (llm.engine.runner.graphs is None) == eager
            runs.append(llm.generate(prompts, params))
        finally:
            llm.close()
        del llm
        free_cuda()
    assert_greedy_runs_agree(*runs)


def quantised_weight(fmt: str, n: int, k: int, gen: torch.Generator):
    """A random packed weight of `fmt` and its dequantised value [n, k] (fp32)."""
    from nanokyro.quant_formats import FP8, dequantise_fp8, dequantise_int4, pack_rows

    if fmt.startswith("int4"):
        g = int(fmt.removeprefix("int4-g"))
        q = torch.randint(0, 16, (n, k), generator=gen, device=DEVICE, dtype=torch.int32)
        scales = (torch.rand(n, k // g, generator=gen, device=DEVICE) * 2 / k**0.5).bfloat16()
        zeros = torch.randint(0, 16, (n, k // g), generator=gen, device=DEVICE).bfloat16()
        args = (pack_rows(q), scales, zeros)
        return args, dequantise_int4(*args)
    w = torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5
    cols = 1 if fmt == "fp8-channel" else -(-k // 128)
    scale = w.abs().amax(1, keepdim=True).expand(n, cols).contiguous() / 448
    wq = (w / scale.repeat_interleave(128 if cols > 1 else k, 1)[:, :k]).to(FP8)
    return (wq, scale), dequantise_fp8(wq, scale)


@pytest.mark.parametrize("fmt", ["fp8-channel", "fp8-block", "int4-g128", "int4-g32"])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 200, 600])
def test_quantised_kernels_match_dequantised_matmul(fmt, rows):
    """The FP8 / int4 linear ops (Triton GEMV and tiles, `_scaled_mm` for per-channel FP8 from 17 rows) against an
    fp32 matmul with the dequantised weight; shapes with partial blocks, a stacked gate/up and a bias."""
    from nanokyro import quant

    gen = torch.Generator(DEVICE).manual_seed(rows)
    for n, k, kind in [(4096, 14336, "plain"), (6150, 4096, "bias"), (1000, 2048, "gated"), (37, 1024, "plain")]:
        if fmt == "fp8-block" and kind == "plain" and n == 37:
            k = 1000  # a partial last block
        n_rows = 2 * n if kind == "gated" else n
        args, w = quantised_weight(fmt, n_rows, k, gen)
        x = torch.randn(rows, k, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16) if kind == "bias" else None
        want = x.float() @ w.T + (b.float() if b is not None else 0)
        if kind == "gated":
            want = torch.nn.functional.silu(want[:, :n]) * want[:, n:]
        if fmt.startswith("int4"):
            got = torch.ops.nanokyro.int4_linear(x, *args, b, kind == "gated")
        else:
            got = torch.ops.nanokyro.fp8_linear(x, *args, b, kind == "gated", fmt == "fp8-channel")
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        w8a8 = fmt == "fp8-channel" and rows > quant.GEMV_MAX_ROWS  # activations in FP8 too: FP8's error
        assert rel_err(got.float(), want) < (6e-2 if w8a8 else 1e-2), (n, k, kind)


@pytest.mark.parametrize("rows", [17, 200])
def test_fp8_tensorwise_scaling_matches_rowwise(rows):
    """W8A8 with the scales applied after cuBLASLt's unit-scale fp8 GEMM (quant.W8A8_TENSORWISE_MAX_ROWS) against
    `_scaled_mm`'s rowwise scaling: the same quantised operands and fp32 sums, so the outputs differ by bf16
    rounding only; a partial block of 16 outputs (padded)."""
    from nanokyro import quant

    gen = torch.Generator(DEVICE).manual_seed(rows)
    for n, k in [(4096, 14336), (6150, 4096), (37, 1024)]:
        (wq, scale), _ = quantised_weight("fp8-channel", n, k, gen)
        x = torch.randn(rows, k, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        rowwise = quant._scaled_mm_fp8(x, wq, scale, "rowwise").float()
        tensorwise = quant._scaled_mm_fp8(x, wq, scale, "tensorwise").float()
        assert tensorwise.shape == (rows, n)
        assert rel_err(tensorwise, rowwise) < 1e-3, (n, k)


def test_fp8_one_row_words_settings_match_dequantised_matmul():
    """The sweep's one-row FP8 settings that read the weight as words (inline PTX, which the CPU interpreter
    cannot run) against an fp32 matmul with the dequantised weight: plain with a long K, a bias, gated, a
    partial block of rows."""
    from nanokyro.benchmarks.quant_kernels import fp8_configs, label
    from nanokyro.quant_triton import qgemv

    gen = torch.Generator(DEVICE).manual_seed(0)
    for n, k, kind in [(4096, 14336, "plain"), (6150, 4096, "bias"), (1000, 2048, "gated"), (37, 1024, "plain")]:
        (wq, scale), w = quantised_weight("fp8-channel", 2 * n if kind == "gated" else n, k, gen)
        x = torch.randn(1, k, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16) if kind == "bias" else None
        want = x.float() @ w.T + (b.float() if b is not None else 0)
        if kind == "gated":
            want = torch.nn.functional.silu(want[:, :n]) * want[:, n:]
        for config in [c for c in fp8_configs(1) if c.words]:
            got = qgemv(x, wq, scale, None, b, kind == "gated", config)
            assert rel_err(got.float(), want) < 1e-2, (label(config), n, k, kind)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 32, 33, 64, 65, 200, 512, 600])
def test_int4_mma_kernels_match_dequantised_matmul(group, rows):
    """int4 in the MMA layout (quant_cuda.py): the dequantise kernel gives quant_formats.dequantise_mma's weight,
    and the op (the GEMV up to quant_cuda.MAX_ROWS rows, a GEMM up to quant.WGMMA_MAX_ROWS or MMA_GEMM_MAX_ROWS,
    dequantise + cuBLAS above) matches an fp32 matmul with it; bf16 and fp16, a stacked gate/up, a bias, a
    strip-sized layer and a K that the warps share unevenly."""
    from nanokyro import quant  # registers nanokyro::int4_mma_linear
    from nanokyro.quant_cuda import (MAX_ROWS, WG_HEIGHTS, w4_dequantise, w4_gemm, w4_gemv, w4_gemvb, w4_wgmma,
                                     wgmma_available)
    from nanokyro.quant_formats import dequantise_mma, mma_pack, mma_scales_zeros

    gen = torch.Generator(DEVICE).manual_seed(rows + group)
    cases = [(4096, 14336, "plain", torch.bfloat16), (6144, 4096, "bias", torch.bfloat16),
             (1024, 2048, "gated", torch.bfloat16), (16, 1152, "plain", torch.bfloat16),
             (2048, 1024, "gated", torch.float16), (96, 640, "bias", torch.float16)]  # fmt: skip
    for n, k, kind, dtype in cases:
        if k % group:
            continue
        n_rows = 2 * n if kind == "gated" else n
        q = torch.randint(0, 16, (n_rows, k), generator=gen, device=DEVICE, dtype=torch.int32)
        scales = (torch.rand(n_rows, k // group, generator=gen, device=DEVICE) * 2 / k**0.5).to(dtype)
        zeros = torch.randint(0, 16, scales.shape, generator=gen, device=DEVICE).to(dtype)
        packed, sz = mma_pack(q), mma_scales_zeros(scales, zeros)
        w = dequantise_mma(packed, sz, dtype)
        assert (w4_dequantise(packed, sz, group, dtype).float() - w).abs().max() <= w.abs().max() / 128
        x = torch.randn(rows, k, generator=gen, device=DEVICE, dtype=dtype)
        b = torch.randn(n, generator=gen, device=DEVICE, dtype=dtype) if kind == "bias" else None
        want = x.float() @ w.T + (b.float() if b is not None else 0)
        if kind == "gated":
            want = torch.nn.functional.silu(want[:, :n]) * want[:, n:]
        got = torch.ops.nanokyro.int4_mma_linear(x, packed, sz, group, b, kind == "gated")
        assert got.shape == (rows, n) and got.dtype == dtype
        assert rel_err(got.float(), want) < 1e-2, (n, k, kind, dtype)
        if rows <= MAX_ROWS:  # the sweep's other settings
            for warps in (1, 4, 16):
                got = w4_gemv(x, packed, sz, group, b, kind == "gated", warps)
                assert rel_err(got.float(), want) < 1e-2, (n, k, kind, dtype, warps)
                if wgmma_available(x.device):
                    got = w4_gemvb(x, packed, sz, group, b, kind == "gated", warps)
                    assert rel_err(got.float(), want) < 1e-2, (n, k, kind, dtype, "gemvb", warps)
        else:  # the GEMM itself (past the dispatch's limit too), with K split in 1 and 3
            for splits in (1, 3):
                got = quant._gate(w4_gemm(x, packed, sz, group, b, splits), kind == "gated")
                assert rel_err(got.float(), want) < 1e-2, (n, k, kind, dtype, "w4_gemm", splits)
                if wgmma_available(x.device):  # and the warpgroup-MMA GEMM with each CTA height
                    for bn in WG_HEIGHTS:
                        got = quant._gate(w4_wgmma(x, packed, sz, group, b, splits, bn), kind == "gated")
                        assert rel_err(got.float(), want) < 1e-2, (n, k, kind, dtype, "w4_wgmma", splits, bn)


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_quantised_engine_graphs_match_eager(method):
    """A quantised model through the compiled steps and the decode graphs gives the eager engine's logits, step by
    step for every sequence whose tokens so far agree. Not its greedy tokens: with FP8 the prefill's activations
    are quantised too, so the compiled kernels' bf16 roundings move some FP8 roundings, and on this dummy model the
    first step's logits differ by 0.09-0.10 relative (session 15; by 0.25-0.33 at most, with the W8A8 scales applied
    by `_scaled_mm` or after it alike), and top-2 margins of 0.0-0.05 (the logits' std is 0.64) flip 1 to 3 of the 6
    argmaxes. A stale graph buffer, a row's logits in another row or a misapplied scale are off by about 1.4."""
    prompts = [[5 + i, 17, 300 + i, 9] for i in range(6)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = qwen3(quantization=method, enforce_eager=eager)
        if method == "awq":  # every layer repacked for quant_cuda's kernels (qwen3-0.6b's shapes all fit)
            layers = [m for m in llm.engine.runner.model.modules() if hasattr(m, "quant")]
            assert layers and all(hasattr(m, "mma_scales_zeros") for m in layers)
        seen = record_logits(llm)
        tokens = [o.token_ids for o in llm.generate(prompts, params)]
        runs.append((tokens, [step.float().cpu() for step in seen]))
        del llm, seen
        free_cuda()
    (tokens_e, steps_e), (tokens_g, steps_g) = runs
    assert min(len(steps_e), len(steps_g)) >= params.max_tokens
    compared = 0
    for t, (e, g) in enumerate(zip(steps_e[: params.max_tokens], steps_g)):
        agree = [i for i in range(len(prompts)) if tokens_e[i][:t] == tokens_g[i][:t]]
        if agree:
            err = (e[agree] - g[agree]).norm(dim=-1) / e[agree].norm(dim=-1)
            assert err.max() < 0.4, (t, err)
        compared += len(agree)
    assert compared > len(prompts), (tokens_e, tokens_g)  # some decode steps (through the graphs) compared too


@pytest.mark.parametrize("rows", [1, 20])
def test_fp8_lm_head_gives_the_bf16_heads_logits(rows):
    """quantize_lm_head on CUDA: the FP8 engine's tied head multiplied in FP8 (the Triton GEMV in the one-row decode
    graph; W8A8 in the 24-row one) gives the logits of the same engine with its bf16 head, on the same decode
    inputs, to FP8's rounding of the head's weights (and at 20 rows of its input too): about 3% each. The two are
    not equal (the FP8 copy is what the head multiplies); a misapplied scale or a row's logits in another row
    would be off by about 1."""
    logits = []
    for fp8_head in (False, True):
        llm = qwen3(quantization="fp8", quantize_lm_head=fp8_head, max_num_seqs=32)
        runner = llm.engine.runner
        head = runner.model.head
        assert head.weight.dtype == torch.bfloat16  # tied: the embedding stays bf16
        assert (head.head_scale is not None) == fp8_head
        if fp8_head:
            assert head.head_weight.dtype == torch.float8_e4m3fn
        batch = decoding_batch(llm, rows)
        assert runner.graphs.bucket(batch) == (1 if rows == 1 else 24)
        for seq in batch.seqs:  # the same input in both engines: their prefills may have sampled other tokens
            seq.token_ids[-1] = 1000
        logits.append(runner.forward(batch).float().cpu())
        llm.engine.fail_all()
        del llm, runner, head, batch
        free_cuda()
    assert logits[1].shape == (rows, 151936)
    assert 1e-3 < rel_err(logits[1], logits[0]) < 6e-2
