"""Offline throughput and batch-1 latency benchmark, measured against this machine's roofline and a peer.

`python bench.py` runs the offline recipe nano-vllm and mini-sglang publish: 256 requests of random token ids,
input and output lengths uniform in [100, 1024], seed 0, ignore_eos. It prints output and total tokens/s, the
time floor of this workload on this machine (weights read once per step, the KV bytes each decode step reads,
the FLOPs; bandwidth and matmul rate measured at start-up), the fraction of it achieved, and with `--peer hf`
the ratio to HF transformers' continuous batching on the same workload in the same process. `--latency` runs
one request and compares its decode tokens/s with the weight-read roofline. `--prefix-cache` compares the
time to first token of a cold and a cached long prefix; `--structured-fraction` the decode step time with part
of the batch under a JSON schema against none; `--decode-idle` the wall and GPU-busy time of a decode step of the
whole batch, and the fraction of the step the GPU sits idle. `--speculative-model PATH` or `--speculative-method
ngram` measures speculative decoding (nanokyro/benchmarks/speculative.py): batch-1 tokens/s with and without it,
acceptance, the verify and draft step costs against a decode step, and a batch of 64 with it allowed vs none.

`--serve-url URL` (a running OpenAI-compatible server) or `--serve` (serve.py started here with the same engine
options, on a free local port) runs the same workload online: streamed /v1/completions requests with token-id
prompts, from `--concurrency N` closed-loop clients or at `--request-rate R` Poisson arrivals per second, sent by
`--client-procs` client processes so that the client is not the bottleneck. It reports vLLM's metrics: TTFT,
TPOT, ITL and E2EL at mean/p50/p90/p99, request, output and total token throughput, and failed requests.
`--serve` first runs the workload offline in this process and prints online output throughput as a fraction of
offline. Given comma lists (`--request-rate 1,2,4`), it runs each load level in turn, and `--plot PNG` draws
latency against load. The online mode needs aiohttp, and the plot matplotlib: the `bench` extra.

This file is the command line; what it measures lives in nanokyro/benchmarks/.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nanokyro import LLM
from nanokyro.benchmarks.offline import (run_decode_idle, run_latency, run_lora_load_stall, run_offline,
                                         run_prefix_cache, run_structured)  # fmt: skip
from nanokyro.benchmarks.online import plot_levels, print_levels, run_online
from nanokyro.benchmarks.peer import run_hf_peer
from nanokyro.benchmarks.speculative import print_speculative, run_speculative
from nanokyro.benchmarks.workload import (engine_options, hf_config, make_workload, measure_machine, model_costs,
                                         roofline, write_random_adapters)  # fmt: skip
from nanokyro.cli import add_engine_args
from nanokyro.loader import DUMMY_ARCHITECTURES


def parse_range(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '100-1024' -> (100, 1024)."""
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad length range {text!r}")
    return lo, hi


def parse_levels(text: str) -> list[float]:
    """'4' -> [4.0]; '1,2,4' -> [1.0, 2.0, 4.0]: the load levels to run in turn."""
    levels = [float(x) for x in text.split(",")]
    if not levels or min(levels) <= 0:
        raise argparse.ArgumentTypeError(f"bad load levels {text!r}")
    return levels


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF dir, .gguf, or a dummy architecture name "
                    f"({', '.join(DUMMY_ARCHITECTURES)}); default: the engine's default model")  # fmt: skip
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=parse_range, default=None, help="N or LO-HI (default 100-1024; latency 128)")
    ap.add_argument("--output-len", type=parse_range, default=None, help="N or LO-HI (default 100-1024; latency 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", choices=["hf"], default=None, help="also run HF transformers on the same workload")
    ap.add_argument("--latency", action="store_true", help="batch-1 decode tokens/s vs the weight-read roofline")
    ap.add_argument("--prefix-cache", action="store_true",
                    help="time to first token with a cold vs a cached prefix of --input-len tokens (default 4000)")
    ap.add_argument("--structured-fraction", type=float, default=None,
                    help="decode step time with this fraction of --num-prompts requests JSON-schema constrained")
    ap.add_argument("--decode-idle", action="store_true",
                    help="decode at batch --num-prompts: wall and GPU-busy ms per step, the GPU's idle fraction")
    spec = ap.add_argument_group("speculative runs (with --speculative-model or --speculative-method): batch-1 "
                                 "speed-up, acceptance and step costs, and a batch (--speculative-batch) with "
                                 "speculation allowed vs none, in one engine")  # fmt: skip
    spec.add_argument("--speculative-batch", type=int, default=64, help="the batch compared with and without (0: none)")
    spec.add_argument("--speculative-json", default=None, help="a JSON schema (text) constraining the batch-1 request: "
                      "drafts of the text its grammar forces")  # fmt: skip
    spec.add_argument("--speculative-trials", type=int, default=None, help="batch-1 runs with and without, "
                      "alternating (default: 3 on CUDA, 5 with --speculative-json, else 1)")  # fmt: skip
    spec.add_argument("--prompt", default=None, help="the batch-1 prompt as text (default: random token ids)")
    spec.add_argument("--plain-engine", action="store_true", help="compare with a second engine built without "
                      "speculation (on the CPU its weights are laid out for one row), not with speculation turned "
                      "off in the same engine")  # fmt: skip
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (e.g. for dummy weights)")
    ap.add_argument("--num-loras", type=int, default=None,
                    help="multi-LoRA: make this many random adapters (all seven projections), spread the requests over "
                         "them, and run the same workload on the base model first for the ratio")  # fmt: skip
    ap.add_argument("--lora-rank", type=int, default=16, help="the random adapters' rank (with --num-loras)")
    ap.add_argument("--lora-stall-batch", type=int, default=8,
                    help="the base-model streams decoding while an adapter is loaded (with --num-loras)")
    online = ap.add_mutually_exclusive_group()
    online.add_argument("--serve-url", default=None, help="online: load this running server (e.g. http://host:3000)")
    online.add_argument("--serve", action="store_true",
                        help="online: run the workload offline, then serve.py with these engine options under load")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=parse_levels, default=None,
                      help="online: N closed-loop clients (N or N1,N2,..)")
    load.add_argument("--request-rate", type=parse_levels, default=None,
                      help="online: Poisson arrivals, requests/s (R or R1,R2,..)")  # fmt: skip
    ap.add_argument("--client-procs", type=int, default=min(8, os.cpu_count() or 1),
                    help="online: client processes sending the load (default: min(8, CPUs))")
    ap.add_argument("--api-key", default="none", help="online: the server's API key, if it wants one")
    ap.add_argument("--openai-sdk", action="store_true",
                    help="online: stream through the openai SDK (its own connection pool) instead of raw SSE")
    ap.add_argument("--plot", default=None, help="online: draw latency against the load levels to this PNG")
    ap.add_argument("--json", default=None, help="write the results here")
    add_engine_args(ap)  # the engine's flags, as serve.py's
    args = ap.parse_args(argv)
    if (args.serve or args.serve_url) and not (args.concurrency or args.request_rate):
        ap.error("the online mode needs --concurrency or --request-rate")
    if (args.concurrency or args.request_rate or args.plot) and not (args.serve or args.serve_url):
        ap.error("--concurrency, --request-rate and --plot need --serve or --serve-url")
    if args.client_procs < 1:
        ap.error("--client-procs must be at least 1")
    if args.serve or args.serve_url:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            ap.error("the online mode needs aiohttp: pip install 'nanokyro[bench]'")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install 'nanokyro[bench]'")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    input_len = args.input_len or ((128, 128) if args.latency else (100, 1024))
    output_len = args.output_len or ((256, 256) if args.latency else (100, 1024))
    speculative = bool(args.speculative_model or args.speculative_method)
    if speculative:  # a batch-1 run, like --latency
        input_len = args.input_len or (128, 128)
        output_len = args.output_len or (256, 256)
    num_prompts = 1 if args.latency or speculative else args.num_prompts
    if args.serve or args.serve_url:
        result = run_online(args, input_len, output_len)
        print(f"{result['model']} at {result['url']}: {result['num_prompts']} requests, {result['input_tokens']} "
              f"input + {result['output_tokens']} output tokens")  # fmt: skip
        print_levels(result["levels"])
        if args.plot:
            plot_levels(result["levels"], args.plot)
        return save(result, args.json)

    peer_s = None
    if args.peer == "hf" and not args.latency:  # first, so that the engine's KV cache can take the memory it leaves
        from nanokyro.config import EngineConfig

        ecfg = EngineConfig(model=args.model, **engine_options(args))
        vocab = hf_config(args.model)["vocab_size"]
        prompts, out_lens = make_workload(num_prompts, input_len, output_len, vocab, args.seed)
        peer_s = run_hf_peer(args.model, ecfg.torch_dtype(), ecfg.torch_device(), prompts, out_lens)

    start = time.perf_counter()
    llm = LLM(args.model, **engine_options(args))
    engine = llm.engine
    startup = {"startup_s": time.perf_counter() - start,
               "graphs_startup_s": engine.runner.graphs.startup_s if engine.runner.graphs else None}  # fmt: skip
    print(f"start-up {startup['startup_s']:.1f} s" + (f", of which compile and graph capture "
          f"{startup['graphs_startup_s']:.1f} s" if engine.runner.graphs else ""))  # fmt: skip
    device, dtype = engine.runner.device, engine.runner.dtype
    prompts, out_lens = make_workload(num_prompts, input_len, output_len, engine.vocab_size, args.seed)
    in_lens = [len(p) for p in prompts]
    machine = measure_machine(device, dtype)
    costs = model_costs(llm)
    print(f"weights: {costs['weight_bytes'] / 1e9:.3f} GB read per step"
          + (f" ({engine.cfg.quantization})" if engine.cfg.quantization else "")
          + (", LM head in fp8" if engine.cfg.quantize_lm_head else ""))  # fmt: skip
    result = {
        "model": engine.model_name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "num_prompts": num_prompts, "input_tokens": sum(in_lens),
        "output_tokens": sum(out_lens), "enforce_eager": engine.cfg.enforce_eager,
        "overlap_schedule": engine.cfg.overlap_schedule, **startup, **machine, **costs,
    }  # fmt: skip
    if args.prefix_cache:
        result.update(run_prefix_cache(llm, args.input_len[0] if args.input_len else 4000, args.seed))
        print(f"time to first token, {result['prefix_len']}-token prefix: cold {result['cold_ttft_s'] * 1e3:.1f} ms, "
              f"cached ({result['cached_tokens']} tokens) {result['cached_ttft_s'] * 1e3:.1f} ms: "
              f"{result['ttft_speedup']:.1f}x faster")  # fmt: skip
    elif args.structured_fraction is not None:
        result.update(run_structured(llm, prompts, args.structured_fraction, steps=64))
        print(f"decode step, batch {result['batch']} with {result['constrained']} JSON-schema constrained: "
              f"{result['constrained_step_s'] * 1e3:.2f} ms vs {result['plain_step_s'] * 1e3:.2f} ms unconstrained "
              f"(+{result['overhead']:.1%}; {result['running_at_end']} still running at the end)")  # fmt: skip
    elif args.decode_idle:
        result.update(run_decode_idle(llm, prompts))
        busy = "" if result["step_gpu_busy_ms"] is None else (
            f", GPU busy {result['step_gpu_busy_ms']:.2f} ms: idle {result['gpu_idle_fraction']:.1%} of the step")
        print(f"decode step, batch {result['batch']}: {result['step_wall_ms']:.2f} ms wall{busy}; mean of "
              f"{result['steps']} steps, {result['running_at_end']} still running at the end")  # fmt: skip
    elif args.num_loras:
        import tempfile

        root = tempfile.mkdtemp(prefix="nanokyro-loras-")  # kept: other ranks read adapters from it when swapped in
        loras = write_random_adapters(llm, args.num_loras, args.lora_rank, root, args.seed)
        if args.latency:
            base_s = run_latency(llm, prompts[0], out_lens[0])
            lora_s = run_latency(llm, prompts[0], out_lens[0], lora=loras[0])
            result.update(base_tokens_per_s=1 / base_s, lora_tokens_per_s=1 / lora_s, lora_ratio=base_s / lora_s)
            what = "batch-1 decode"
        else:
            base_s = run_offline(llm, prompts, out_lens)
            lora_s = run_offline(llm, prompts, out_lens, loras)
            result.update(base_tokens_per_s=sum(out_lens) / base_s, lora_tokens_per_s=sum(out_lens) / lora_s,
                          lora_ratio=base_s / lora_s)  # fmt: skip
            what = f"{num_prompts} requests"
        print(f"{what}, {args.num_loras} rank-{args.lora_rank} adapters: {result['lora_tokens_per_s']:.1f} output "
              f"tok/s with adapters vs {result['base_tokens_per_s']:.1f} base (same engine, no adapter): "
              f"{result['lora_ratio']:.1%}")  # fmt: skip
        # One more adapter, registered but not resident (the slots hold the others): its load beside base streams.
        stall_lora = write_random_adapters(llm, 1, args.lora_rank, root, args.seed + 1, first=args.num_loras)[0]
        result.update(run_lora_load_stall(llm, stall_lora, batch=args.lora_stall_batch, seed=args.seed))
        print(f"adapter load beside {result['stall_batch']} decoding streams: longest gap between their tokens "
              f"{result['load_gap_ms']:.2f} ms ({result['load_gap_steps']:.2f} steps of {result['base_step_ms']:.2f} "
              f"ms) vs {result['resident_gap_ms']:.2f} ms ({result['resident_gap_steps']:.2f} steps) with the "
              f"adapter resident: the load stalls them {result['load_stall_steps']:.2f} steps; the adapter's tokens "
              f"{'match' if result['load_tokens_match'] else 'DIFFER'} with the load and resident")  # fmt: skip
    elif args.speculative_model or args.speculative_method:
        prompt = llm.encode(args.prompt) if args.prompt else prompts[0]
        batch = make_workload(args.speculative_batch, input_len, output_len, engine.vocab_size, args.seed)[0]
        trials = args.speculative_trials or (3 if device.type == "cuda" else 5 if args.speculative_json else 1)
        schema = json.loads(args.speculative_json) if args.speculative_json else None
        plain = None
        if args.plain_engine:
            plain = LLM(args.model, **{**engine_options(args), "speculative_model": None,
                                       "speculative_method": None, "speculative_draft_vocab": None,
                                       "speculative_draft_quantization": None})  # fmt: skip
        result.update(run_speculative(llm, prompt, out_lens[0], batch, out_lens[0], trials, schema, plain))
        print_speculative(result)
    elif args.latency:
        step_s = run_latency(llm, prompts[0], out_lens[0])
        floor_s = (costs["weight_bytes"] + (in_lens[0] + out_lens[0] / 2) * costs["kv_bytes_per_token"]) / machine[
            "bandwidth_bytes_per_s"]  # fmt: skip
        result.update(decode_tokens_per_s=1 / step_s, roofline_tokens_per_s=1 / floor_s, fraction_of_roofline=floor_s / step_s)
        print(f"batch-1 decode: {1 / step_s:.1f} tok/s ({step_s * 1e3:.2f} ms/step); weight-read roofline "
              f"{1 / floor_s:.1f} tok/s; {floor_s / step_s:.1%} of roofline")  # fmt: skip
    else:
        elapsed = run_offline(llm, prompts, out_lens)
        floor = roofline(costs, in_lens, out_lens, engine.cfg.max_num_seqs, machine)
        result.update(elapsed_s=elapsed, output_tokens_per_s=sum(out_lens) / elapsed,
                      total_tokens_per_s=(sum(in_lens) + sum(out_lens)) / elapsed, roofline=floor,
                      fraction_of_roofline=floor["floor_s"] / elapsed)  # fmt: skip
        print(f"{num_prompts} requests, {sum(in_lens)} input + {sum(out_lens)} output tokens in {elapsed:.2f} s: "
              f"{result['output_tokens_per_s']:.0f} output tok/s, {result['total_tokens_per_s']:.0f} total tok/s")
        print(f"roofline: {floor['floor_s']:.2f} s (memory {floor['memory_s']:.2f} s for {floor['bytes'] / 1e9:.1f} GB "
              f"at {machine['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s; compute {floor['compute_s']:.2f} s for "
              f"{floor['flops'] / 1e12:.1f} TFLOP at {machine['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s); "
              f"{result['fraction_of_roofline']:.1%} of roofline")  # fmt: skip
        if peer_s is not None:
            result.update(peer="hf", peer_elapsed_s=peer_s, peer_output_tokens_per_s=sum(out_lens) / peer_s,
                          speedup_vs_peer=peer_s / elapsed)  # fmt: skip
            print(f"HF transformers continuous batching: {peer_s:.2f} s, {sum(out_lens) / peer_s:.0f} output tok/s; "
                  f"nanokyro is {peer_s / elapsed:.1f}x faster")  # fmt: skip
    return save(result, args.json)


def save(result: dict, path: str | None) -> dict:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
