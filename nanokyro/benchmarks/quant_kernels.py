"""Microbenchmark of the quantised linear ops against bf16 cuBLAS: llama-3.1-8b's qkv, o, gate/up and down
projections of one layer, random weights, CUDA-graph replay, for each row count. Where each path should take
over (quant.GEMV_MAX_ROWS, quant.INT4_DEQUANT_ROWS) is read from this. `python -m nanokyro.benchmarks.quant_kernels`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanokyro import quant

SHAPES = [(6144, 4096, False), (4096, 4096, False), (28672, 4096, True), (4096, 14336, False)]  # (N, K, gated)
ROWS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `reps` calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def layer_ops(rows: int):
    dev, gen = "cuda", torch.Generator("cuda").manual_seed(0)
    ops = {"bf16": [], "fp8": [], "int4": [], "int4-dequant": []}
    nbytes = {"bf16": 0, "fp8": 0, "int4": 0, "int4-dequant": 0}
    for n, k, gated in SHAPES:
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=gen)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / k**0.5
        scale = (w.float().abs().amax(1, keepdim=True) / 448)
        wq = (w.float() / scale).to(quant.FP8)
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32, generator=gen)
        qw, s, z = quant.pack_rows(q), torch.rand(n, k // 128, device=dev).bfloat16() / 100, torch.full(
            (n, k // 128), 8.0, device=dev).bfloat16()
        ops["bf16"].append(lambda x=x, w=w, g=gated: quant._gate(F.linear(x, w), g))
        ops["fp8"].append(lambda x=x, w=wq, s=scale, g=gated: torch.ops.nanokyro.fp8_linear(x, w, s, None, g, True))
        ops["int4"].append(lambda x=x, w=qw, s=s, z=z, g=gated: quant._gemv(x, w, s, z, None, g))
        ops["int4-dequant"].append(lambda x=x, w=qw, s=s, z=z, g=gated: quant._gate(
            F.linear(x, quant.dequantise_int4_cuda(w, s, z, x.dtype)), g))
        nbytes["bf16"] += w.numel() * 2
        nbytes["fp8"] += wq.numel() + scale.numel() * 4
        nbytes["int4"] += qw.numel() * 4 + s.numel() * 4
        nbytes["int4-dequant"] += qw.numel() * 4 + s.numel() * 4
    return ops, nbytes


def main() -> None:
    print(f"{'rows':>5} " + " ".join(f"{k:>22}" for k in ("bf16", "fp8", "int4", "int4-dequant")))
    for rows in ROWS:
        ops, nbytes = layer_ops(rows)
        cells = []
        for name, fns in ops.items():
            if name == "int4-dequant" and rows < 64:
                cells.append(f"{'-':>22}")
                continue
            t = graph_time(lambda fns=fns: [f() for f in fns])
            cells.append(f"{t * 1e6:9.1f} us {nbytes[name] / t / 1e12:5.2f} TB/s")
        print(f"{rows:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
