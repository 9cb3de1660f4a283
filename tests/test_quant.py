"""FP8 and 4-bit weights on the CPU: checkpoints written here in each format's documented layout from a tiny random
HF llama (block-wise FP8, compressed-tensors FP8_DYNAMIC, AutoAWQ GEMM, compressed-tensors W4A16) load and match
transformers running the same model with the dequantised weights; packed values read as the formats document;
TP=2 gives TP=1's tokens; bad quantisation requests fail clearly."""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model, run_in_interpreter
from nanokyro import LLM, SamplingParams
from nanokyro.quant_formats import FP8, quant_config, unpack_awq, unpack_rows

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32)  # whole groups of 32..128 and FP8 blocks of 128
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ packs output feature AWQ_ORDER[i] into bits 4i..4i+3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("base")), **SHAPE)


def prompts(n=48, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR


# -- writers: each format as its documentation lays it out ------------------------------------------------------


def write_checkpoint(base: str, dst: str, tensors: dict, quantization_config: dict) -> str:
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(base):
        if f != "model.safetensors":
            shutil.copy(os.path.join(base, f), dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def fp8_block(w: torch.Tensor, b: int = 128):
    """weight fp8 [N, K] and weight_scale_inv [ceil(N/b), ceil(K/b)]: w ~ fp8 * scale of its b x b block."""
    n, k = w.shape
    nb, kb = -(-n // b), -(-k // b)
    padded = torch.zeros(nb * b, kb * b)
    padded[:n, :k] = w
    blocks = padded.view(nb, b, kb, b)
    scale = blocks.abs().amax((1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).to(FP8).view(nb * b, kb * b)[:n, :k]
    deq = (q.float().view(n, k) * scale.repeat_interleave(b, 0)[:n].repeat_interleave(b, 1)[:, :k])
    return q, scale, deq


def fp8_channel(w: torch.Tensor):
    scale = w.abs().amax(1, keepdim=True) / 448
    q = (w / scale).to(FP8)
    return q, scale, q.float() * scale


def int4_groups(w: torch.Tensor, g: int, symmetric: bool):
    """Round to nearest over groups of g input features: q [N, K] and (scale, zero) [N, K/g]; w ~ (q - zero) * scale
    (symmetric: q in -8..7, zero 0)."""
    n, k = w.shape
    grp = w.reshape(n, k // g, g)
    if symmetric:
        scale = grp.abs().amax(-1) / 7
        zero = torch.zeros_like(scale)
        q = (grp / scale[..., None]).round().clamp(-8, 7)
    else:
        lo, hi = grp.amin(-1), grp.amax(-1)
        scale = (hi - lo) / 15
        zero = (-lo / scale).round()
        q = (grp / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(n, k)
    return q.reshape(n, k).to(torch.int32), scale, zero.to(torch.int32), deq


def pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: int [R, C] -> int32 [R, C/8], column j's nibble i = feature 8j + AWQ_ORDER[i]."""
    r, c = intweight.shape
    packed = torch.zeros(r, c // 8, dtype=torch.int64)
    for i in range(8):
        packed |= intweight[:, AWQ_ORDER[i] :: 8].to(torch.int64) << (4 * i)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same 32 bits as a signed int32


def pack_ct(signed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors pack-quantized: int4 [N, K] (-8..7) stored as value + 8, feature 8j + i in bits 4i.."""
    u = (signed + 8).to(torch.int64)
    packed = torch.zeros(u.shape[0], u.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        packed |= u[:, i::8] << (4 * i)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)


def quantised_checkpoint(base: str, dst: str, fmt: str, group: int = 128) -> tuple[str, dict]:
    """Write `fmt`; return its path and the dequantised weights (HF names) for the reference model."""
    sd = load_file(os.path.join(base, "model.safetensors"))
    out, deq = {}, {}
    for name, w in sd.items():
        if not is_linear(name):
            out[name] = w
            continue
        prefix = name.removesuffix(".weight")
        if fmt == "fp8-block":
            out[name], out[f"{prefix}.weight_scale_inv"], deq[name] = fp8_block(w)
        elif fmt == "ct-fp8":
            out[name], out[f"{prefix}.weight_scale"], deq[name] = fp8_channel(w)
        elif fmt == "awq":
            q, scale, zero, deq[name] = int4_groups(w, group, symmetric=False)
            out[f"{prefix}.qweight"] = pack_awq(q.t())  # AWQ is [in, out]
            out[f"{prefix}.qzeros"] = pack_awq(zero.t())
            out[f"{prefix}.scales"] = scale.t().half()
            deq[name] = ((q - zero.repeat_interleave(group, 1)) * scale.half().float().repeat_interleave(group, 1))
        elif fmt == "ct-w4a16":
            q, scale, _, _ = int4_groups(w, group, symmetric=True)
            out[f"{prefix}.weight_packed"] = pack_ct(q)
            out[f"{prefix}.weight_scale"] = scale.bfloat16()
            out[f"{prefix}.weight_shape"] = torch.tensor(w.shape)
            deq[name] = q * scale.bfloat16().float().repeat_interleave(group, 1)
    qc = {
        "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "ct-fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                   "config_groups": {"group_0": {"targets": ["Linear"],
                       "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                   "dynamic": False},
                       "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                             "symmetric": True}}}},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "ct-w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                         "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                         "group_size": group}}}},
    }[fmt]  # fmt: skip
    return write_checkpoint(base, dst, out, qc), deq


def reference(base: str, deq: dict):
    """transformers running the base model with the dequantised weights."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    sd = hf.state_dict()
    sd.update(deq)
    hf.load_state_dict(sd)
    return hf


def with_fp8_activations(hf, modules=LINEAR):
    """transformers with the input of each linear layer named in `modules` quantised to FP8 per token and back
    (dynamic scales), as W8A8 computes it."""

    def qdq(module, args):
        x = args[0]
        scale = (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
        return ((x / scale).to(FP8).float() * scale,)

    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in modules:
            module.register_forward_pre_hook(qdq)
    return hf


def last_logits(llm: LLM, ps) -> torch.Tensor:
    """The engine's logits at each prompt's last token, all prompts in one step."""
    engine = llm.engine
    for p in ps:
        engine.add_request(p, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    assert batch.num_new == [len(p) for p in ps]
    with torch.inference_mode():
        logits = engine.runner.forward(batch).float()
    engine.fail_all()
    return logits


def hf_last_logits(hf, ps) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in ps])


def make_llm(path, **kw):
    return LLM(path, dtype="float32", kv_cache_memory=1 << 24, max_num_seqs=64, **kw)


# -- packed values read by hand from the formats' documentation -------------------------------------------------


def test_packed_values_read_as_documented():
    # AutoAWQ: features 0..7 hold 1..8; nibble i (bits 4i..) holds feature AWQ_ORDER[i] = 0 2 4 6 1 3 5 7, so the
    # nibbles from the lowest are 1 3 5 7 2 4 6 8: 0x86427531.
    awq = torch.tensor([[0x86427531 - 2**32]], dtype=torch.int32)
    assert unpack_awq(awq).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # compressed-tensors: input features 0..7 hold -8..-1, stored + 8 as 0..7, feature i in bits 4i..: 0x76543210.
    assert (unpack_rows(torch.tensor([[0x76543210]], dtype=torch.int32)) - 8).tolist() == [list(range(-8, 0))]
    # FP8 e4m3: 0x38 is 1.0 (exponent 7 - bias 7), 0x40 is 2.0, 0xC4 is -3.0.
    assert torch.tensor([0x38, 0x40, 0xC4], dtype=torch.uint8).view(FP8).float().tolist() == [1.0, 2.0, -3.0]
    # The test's own writers produce those bits.
    assert pack_awq(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).item() == 0x86427531 - 2**32
    assert pack_ct(torch.tensor([list(range(-8, 0))])).item() == 0x76543210


def test_mma_layout_read_as_documented():
    """The MMA fragment layout (quant_formats.py): lane 5 (rows 1 and 9, features 4..7 of each 16) of strip 0,
    block 0, step 2 holds features 36..39. Nibble t is row 1 + 8 (t & 1), feature 36 + 2 ((t >> 1) & 1) + t // 4;
    with q = (n + k) % 16 the nibbles from t = 0 up are 5 13 7 15 6 14 8 0, i.e. 0x08E6F7D5."""
    from nanokyro.quant_formats import mma_pack, mma_unpack

    n, k = torch.meshgrid(torch.arange(32), torch.arange(128), indexing="ij")
    q = (n + k) % 16
    packed = mma_pack(q)
    assert packed.shape == (2, 2, 32, 4) and packed.dtype == torch.int32
    assert packed[0, 0, 5, 2].item() == 0x08E6F7D5
    q = torch.randint(0, 16, (48, 320))
    assert torch.equal(mma_unpack(mma_pack(q)), q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_scales_and_zeros_give_the_awq_weight(dtype):
    """The MMA layout's scale/zero words: the scale and -(MMA_MAGIC + zero) in the dtype, which MMA_MAGIC + q
    turns into (q - zero) * scale; only zeros that are whole numbers 0..15 go into it."""
    from nanokyro.quant_formats import (dequantise_int4, dequantise_mma, mma_layout_applies, mma_pack,
                                        mma_scales_zeros, pack_rows)  # fmt: skip

    q = torch.randint(0, 16, (32, 256))
    scales, zeros = (torch.rand(32, 8) / 16).to(dtype), torch.randint(0, 16, (32, 8)).to(dtype)
    sz = mma_scales_zeros(scales, zeros)
    assert sz.shape == (8, 32) and sz.dtype == torch.int32
    assert torch.equal(dequantise_mma(mma_pack(q), sz, dtype), dequantise_int4(pack_rows(q), scales, zeros))
    assert mma_layout_applies(32, 256, 32, dtype, zeros)
    assert not mma_layout_applies(32, 256, 32, dtype, zeros + 0.5)  # a zero between two values
    assert not mma_layout_applies(24, 256, 32, dtype, zeros)  # a partial strip
    assert not mma_layout_applies(48, 256, 32, dtype, zeros, gated=True)  # gate and up of 24 rows: partial strips
    assert mma_layout_applies(64, 256, 32, dtype, zeros, gated=True)
    assert not mma_layout_applies(32, 256, 32, torch.float32, zeros)


# -- checkpoints against transformers ---------------------------------------------------------------------------


def test_block_fp8_checkpoint_matches_transformers_loading_it(base, tmp_path):
    path, deq = quantised_checkpoint(base, str(tmp_path / "fp8"), "fp8-block")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # dequantises on CPU
    assert hf.model.layers[0].mlp.down_proj.weight.dtype != FP8
    torch.testing.assert_close(hf.model.layers[0].mlp.down_proj.weight.float(),
                               deq["model.layers.0.mlp.down_proj.weight"], atol=1e-2, rtol=1e-2)  # fmt: skip
    llm = make_llm(path)
    layer = llm.engine.runner.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == FP8 and layer.quant is not None
    ps = prompts()
    ours, ref = last_logits(llm, ps), hf_last_logits(hf, ps)
    # Weight-only on the CPU (block-wise scales dequantise): the same model up to transformers' bf16 rounding.
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.05)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("tensorwise_max_rows", [0, 10**9], ids=["rowwise", "tensorwise"])
def test_compressed_tensors_fp8_matches_dequantised_reference(base, tmp_path, monkeypatch, tensorwise_max_rows):
    """W8A8 with the scales applied by `_scaled_mm` (rowwise) and after it (tensorwise), at every row count."""
    from nanokyro import quant

    monkeypatch.setattr(quant, "W8A8_TENSORWISE_MAX_ROWS", tensorwise_max_rows)
    path, deq = quantised_checkpoint(base, str(tmp_path / "ctfp8"), "ct-fp8")
    hf = reference(base, deq)
    llm = make_llm(path)
    ps = prompts()
    ours, weight_only = last_logits(llm, ps), hf_last_logits(hf, ps)
    # W8A8: the activations are quantised per token too. Against the same in transformers, the logits match up to
    # the few activations whose FP8 rounding flips with the matmul's summation order.
    ref = hf_last_logits(with_fp8_activations(hf), ps)
    err = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.median() < 1e-4 and err.max() < 0.1, err  # to fp32 rounding but where an FP8 rounding flips
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    # Against the weight-only model: FP8 activation noise on a tiny random model keeps most first tokens.
    assert (ours.argmax(-1) == weight_only.argmax(-1)).float().mean() >= 0.6


@pytest.mark.parametrize("fmt,group", [("awq", 32), ("awq", 64), ("awq", 128), ("ct-w4a16", 128), ("ct-w4a16", 32)])
def test_int4_checkpoint_matches_dequantised_reference(base, tmp_path, fmt, group):
    path, deq = quantised_checkpoint(base, str(tmp_path / fmt), fmt, group)
    hf = reference(base, deq)
    llm = make_llm(path)
    model = llm.engine.runner.model
    assert model.layers[0].self_attn.qkv_proj.qweight.dtype == torch.int32
    ps = prompts()
    # Weight-only: the same arithmetic as the dequantised model, to fp32 rounding.
    torch.testing.assert_close(last_logits(llm, ps), hf_last_logits(hf, ps), atol=2e-4, rtol=2e-4)
    out = llm.generate(ps[:4], SamplingParams(max_tokens=8, temperature=0))
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist() for p in ps[:4]]
    assert [o.token_ids for o in out] == refs


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_quantising_at_load_matches_reference_quantisation(base, method):
    sd = load_file(os.path.join(base, "model.safetensors"))
    if method == "fp8":
        deq = {k: fp8_channel(w)[2] for k, w in sd.items() if is_linear(k)}
    else:
        deq = {k: int4_groups(w, 128, symmetric=False)[3] for k, w in sd.items() if is_linear(k)}
    hf = reference(base, deq) if method == "awq" else with_fp8_activations(reference(base, deq))
    llm = make_llm(base, quantization=method)
    ps = prompts()
    ours, ref = last_logits(llm, ps), hf_last_logits(hf, ps)
    if method == "awq":
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    else:
        err = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err.median() < 1e-4 and err.max() < 0.1, err  # to fp32 rounding but where an FP8 rounding flips
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_a_misread_format_would_be_caught(base, tmp_path):
    """The comparisons above are not vacuous: AWQ's nibbles read in plain order land near chance."""
    path, deq = quantised_checkpoint(base, str(tmp_path / "awq"), "awq", 128)
    hf = reference(base, deq)
    sd = load_file(os.path.join(path, "model.safetensors"))
    for k in sd:
        if k.endswith(("qweight", "qzeros")):  # plain nibble order instead of AWQ's
            sd[k] = pack_ct(unpack_awq(sd[k]) - 8)
    save_file(sd, os.path.join(path, "model.safetensors"))
    ps = prompts()
    agree = (last_logits(make_llm(path), ps).argmax(-1) == hf_last_logits(hf, ps).argmax(-1)).float().mean()
    assert agree < 0.5


def test_quantised_weights_take_the_bytes_the_format_promises(base):
    dense = make_llm(base).engine.runner.model
    linear = sum(m.weight.numel() for m in dense.modules() if hasattr(m, "multiply"))
    total = sum(p.numel() * p.element_size() for p in dense.parameters())
    other = total - linear * 4  # fp32 embeddings, head, norms
    for method, per_weight in (("fp8", 1), ("awq", 0.5)):
        model = make_llm(base, quantization=method).engine.runner.model
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        # the packed weights plus their scales (fp8: 4 bytes per output feature; int4: 2 x 4 bytes per 128)
        assert other + linear * per_weight < size < other + linear * per_weight * 1.2, (method, size)


@pytest.mark.parametrize("fmt,group,tp,pp", [("awq", 32, 2, 1), ("fp8-block", 128, 2, 1), ("awq", 64, 1, 2)])
def test_parallel_quantised_gives_one_process_tokens(base, tmp_path, fmt, group, tp, pp):
    """Column-parallel layers shard output features of every tensor, row-parallel ones input features and their
    groups (a group or block that two ranks share gives each the same scale); pipeline stages load their own
    layers' quantised tensors."""
    path, _ = quantised_checkpoint(base, str(tmp_path / fmt), fmt, group)
    ps = prompts(6, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0)
    one = [o.token_ids for o in make_llm(path).generate(ps, params)]
    llm = make_llm(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert [o.token_ids for o in llm.generate(ps, params)] == one
    finally:
        llm.close()


def test_bad_quantisation_requests_fail_clearly(base, tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        make_llm(base, quantization="int3")
    path, _ = quantised_checkpoint(base, str(tmp_path / "fp8"), "fp8-block")
    with pytest.raises(ValueError, match="already quantised"):
        make_llm(path, quantization="awq")
    with pytest.raises(ValueError, match="weight_block_size"):
        quant_config({"quant_method": "fp8", "weight_block_size": [64, 64]}, None)
    with pytest.raises(ValueError, match="group size"):
        quant_config({"quant_method": "awq", "bits": 4, "group_size": 96, "version": "gemm"}, None)


KERNEL_CHECK = """
import torch, torch.nn.functional as F
from nanokyro import quant_formats as qf, quant_triton as qt
torch.manual_seed(0)
worst = 0.0
for rows, fmt, gated, k in [(1, "channel", True, 320), (3, "block", False, 320), (9, "g32", True, 256),
                            (1, "g64", True, 512), (3, "g128", False, 256), (40, "block", True, 256), (40, "g32", False, 256)]:
    n = 24
    w = torch.randn(2 * n if gated else n, k) * 0.05
    x = torch.randn(rows, k)
    if fmt == "channel":
        s = w.abs().amax(1, keepdim=True) / 448
        args = ((w / s).to(qf.FP8), s, None)
    elif fmt == "block":
        s = torch.rand(w.shape[0], -(-k // 128)) * 1e-3 + 1e-4
        args = ((w / s.repeat_interleave(128, 1)[:, :k]).clamp(-448, 448).to(qf.FP8), s, None)
    else:
        g = int(fmt[1:])
        args = (qf.pack_rows(torch.randint(0, 16, w.shape)), torch.rand(w.shape[0], k // g) * 0.01,
                torch.randint(0, 16, (w.shape[0], k // g)).float())
    deq = qf.dequantise_fp8(*args[:2]) if args[2] is None else qf.dequantise_int4(*args)
    want = x @ deq.T
    if gated:
        want = F.silu(want[:, :n]) * want[:, n:]
    got = qt.qgemv(x, *args, None, gated)
    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
got = qt.dequantise_int4_cuda(*args, torch.float32)
assert torch.allclose(got, qf.dequantise_int4(*args), rtol=1e-5, atol=1e-7), "dequantise kernel"
w = torch.randn(24, 320) * 0.05
s = w.abs().amax(1, keepdim=True) / 448
x = torch.randn(1, 320)
want = x @ qf.dequantise_fp8((w / s).to(qf.FP8), s).T
for config in [qt.GemvConfig(1, 4, 64, 4, False, split_k=3), qt.GemvConfig(1, 4, 64, 4, False, prefetch=True),
               qt.GemvConfig(1, 4, 64, 4, False, prefetch=True, reduce_once=True)]:
    got = qt.qgemv(x, (w / s).to(qf.FP8), s, None, None, False, config)
    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
b = torch.randn(12)
w13 = torch.randn(26, 320) * 0.05  # gated, N 13: the last program's second output (and its rows) masked
s13 = w13.abs().amax(1, keepdim=True) / 448
want13 = x @ qf.dequantise_fp8((w13 / s13).to(qf.FP8), s13).T
for x_2d in (False, True):  # the one-row FP8 kernel, gated (N 12 and 13) and with a bias
    config = qt.GemvConfig(1, 4, 64, 4, False, vec=8, x_2d=x_2d)
    got = qt.qgemv(x, (w / s).to(qf.FP8), s, None, None, True, config)
    worst = max(worst, ((got - F.silu(want[:, :12]) * want[:, 12:]).abs().max() / want.abs().max()).item())
    got = qt.qgemv(x, (w13 / s13).to(qf.FP8), s13, None, None, True, config)
    assert got.shape == (1, 13), got.shape
    worst = max(worst, ((got - F.silu(want13[:, :13]) * want13[:, 13:]).abs().max() / want13.abs().max()).item())
    got = qt.qgemv(x, (w / s).to(qf.FP8)[:12], s[:12], None, b, False, config)
    worst = max(worst, ((got - want[:, :12] - b).abs().max() / want.abs().max()).item())
worst_f16 = 0.0
for rows, gated, split in [(1, False, 1), (1, False, 3), (5, True, 1)]:  # the tiles' dot in f16
    x = torch.randn(rows, 320)
    wg = torch.randn(24, 320) * 0.05
    sg = wg.abs().amax(1, keepdim=True) / 448
    want = x @ qf.dequantise_fp8((wg / sg).to(qf.FP8), sg).T
    want = F.silu(want[:, :12]) * want[:, 12:] if gated else want
    config = qt.GemvConfig(16, 16, 64, 4, True, 1, split_k=split, f16=True)
    got = qt.qgemv(x, (wg / sg).to(qf.FP8), sg, None, None, gated, config)
    worst_f16 = max(worst_f16, ((got - want).abs().max() / want.abs().max()).item())
assert worst_f16 < 2e-3, worst_f16  # x rounded to f16: 11 significant bits
acc, rs, cs = torch.randn(5, 1500), torch.rand(5, 1) + 0.5, torch.rand(1500, 1) + 0.5  # the W8A8 epilogue
got = qt.scale_outer_cuda(acc, rs, cs, torch.float32, block_n=256)
assert torch.allclose(got, acc * rs * cs.T, rtol=1e-6, atol=0), "scale_outer kernel"
wide, sz2 = torch.randn(1500, 10), torch.rand(1500, 2)  # strided views: a column of each
got = qt.scale_outer_cuda(wide[:, :5].T, rs, sz2[:, :1], torch.float32)
assert torch.allclose(got, wide[:, :5].T * rs * sz2[:, :1].T, rtol=1e-6, atol=0), "scale_outer kernel, strided"
print(worst)
"""


def test_triton_kernels_match_dequantised_matmul_in_the_interpreter():
    """The CUDA kernels (GEMV at 1 row, 3 rows; tensor-core tiles at 9 and 40; fp8 per-channel and block-wise with
    a partial block; int4 groups of 32, 64, 128; gated; split-K; prefetching; the one-row FP8 kernel, gated with a
    partial last block too; the W8A8 scales' epilogue; the tiles' dot in f16) run by Triton's interpreter on the
    CPU, against the dequantised weight."""
    assert float(run_in_interpreter(KERNEL_CHECK)) < 1e-5


# -- the LM head in FP8 (quantize_lm_head) ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fp8_lm_head_matches_transformers_with_the_dequantised_head(base, tmp_path, tied):
    """`quantization="fp8"` with `quantize_lm_head`: the head's weight rounded per vocab row to FP8 and multiplied
    W8A8 through the FP8 layers' op gives the logits of transformers running the dequantised FP8 layers and head
    (each one's input quantised per token). A tied head's embedding stays in full precision; an untied head's
    full-precision weight is freed. The FP8 copy is what the head multiplies: the same model with the
    full-precision head is farther off by more than FP8's rounding of a few activations."""
    path = build_tiny_model("llama", str(tmp_path / "tied"), tie_word_embeddings=True, **SHAPE) if tied else base
    sd = load_file(os.path.join(path, "model.safetensors"))
    deq = {k: fp8_channel(w)[2] for k, w in sd.items() if is_linear(k)}
    head_fp8 = fp8_channel(sd["model.embed_tokens.weight" if tied else "lm_head.weight"])[2]
    full_head = with_fp8_activations(reference(path, deq))
    hf = reference(path, deq)
    hf.lm_head.weight = torch.nn.Parameter(head_fp8)  # (tied: the embedding keeps the full-precision table)
    hf = with_fp8_activations(hf, LINEAR + ("lm_head",))
    llm = make_llm(path, quantization="fp8", quantize_lm_head=True)
    model = llm.engine.runner.model
    head = model.head
    assert head.head_weight.dtype == FP8 and head.head_scale.shape == (384, 1)
    if tied:
        assert head is model.embed_tokens and head.weight.dtype == torch.float32
        torch.testing.assert_close(head.weight, sd["model.embed_tokens.weight"], atol=0, rtol=0)
    else:
        assert head.weight is None
    ps = prompts()
    ours, ref = last_logits(llm, ps), hf_last_logits(hf, ps)
    err = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.median() < 1e-4 and err.max() < 0.1, err  # to fp32 rounding but where an FP8 rounding flips
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    full = hf_last_logits(full_head, ps)
    assert ((ours - full).norm(dim=-1) / full.norm(dim=-1)).median() > 1e-2  # the head's FP8 rounding: 0.037


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fp8_lm_head_reads_a_byte_a_weight(base, tmp_path, tied):
    """The benchmarks' roofline counts the head at its FP8 bytes (a byte a weight, 4 bytes of scale a vocab row)
    in place of its full-precision ones, tied or not; the resident weights (quant.weight_bytes) too when untied."""
    from nanokyro.benchmarks.workload import model_costs
    from nanokyro.quant import weight_bytes

    path = build_tiny_model("llama", str(tmp_path / "tied"), tie_word_embeddings=True, **SHAPE) if tied else base
    dense_head, fp8_head = (make_llm(path, quantization="fp8", quantize_lm_head=q) for q in (False, True))
    vocab, hidden = 384, SHAPE["hidden_size"]
    saved = vocab * hidden * 4 - (vocab * hidden + vocab * 4)  # fp32 -> fp8 + an fp32 scale a row
    assert model_costs(dense_head)["weight_bytes"] - model_costs(fp8_head)["weight_bytes"] == saved
    resident = [weight_bytes(llm.engine.runner.model) for llm in (dense_head, fp8_head)]
    assert resident[1] - resident[0] == (vocab * hidden + vocab * 4 if tied else -saved)


def test_fp8_lm_head_without_fp8_weights_fails_clearly(base, tmp_path):
    """Refused before any weights load: no quantisation, AWQ asked for, or an AWQ checkpoint."""
    path, _ = quantised_checkpoint(base, str(tmp_path / "awq"), "awq", 128)
    for model, quantization, found in [(base, None, "unquantised weights"), (base, "awq", "awq (online)"),
                                       (path, None, "awq (awq-gemm)")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"quantize_lm_head .* needs quantization='fp8' or an FP8 checkpoint, "
                                             rf"not {re.escape(found)}"):  # fmt: skip
            make_llm(model, quantization=quantization, quantize_lm_head=True)


def test_quantize_lm_head_flag_reaches_the_engine_config():
    import argparse

    from nanokyro.cli import add_engine_args, engine_flags, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args([]))["quantize_lm_head"] is False
    kwargs = engine_kwargs(p.parse_args(["--quantization", "fp8", "--quantize-lm-head"]))
    assert kwargs["quantize_lm_head"] is True
    assert engine_flags(kwargs) == ["--quantization", "fp8", "--quantize-lm-head"]


def test_parallel_fp8_lm_head_gives_one_process_tokens(base, tmp_path):
    """TP=2 splits the head's vocab rows and their scales: each rank's FP8 copy is made from its own rows (rank 0's
    scales are the first half of one process's), and the greedy tokens are one process's. A block-wise FP8
    checkpoint, whose layers (weight-only on the CPU) round the same on any number of ranks."""
    path, _ = quantised_checkpoint(base, str(tmp_path / "fp8"), "fp8-block")
    ps = prompts(6, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0)
    one_llm = make_llm(path, quantize_lm_head=True)
    one = [o.token_ids for o in one_llm.generate(ps, params)]
    llm = make_llm(path, quantize_lm_head=True, tensor_parallel_size=2)
    try:
        head, one_head = llm.engine.runner.model.head, one_llm.engine.runner.model.head
        assert head.head_weight.shape == (192, SHAPE["hidden_size"]) and head.head_weight.dtype == FP8
        torch.testing.assert_close(head.head_scale, one_head.head_scale[:192], atol=0, rtol=0)
        assert [o.token_ids for o in llm.generate(ps, params)] == one
    finally:
        llm.close()
