"""Serve a model over the OpenAI-compatible HTTP API: `python serve.py [--model DIR|FILE.gguf|HUB_ID] [options]`.

This process runs the HTTP frontend; the engine core (the model, scheduler and step loop) runs in a child process.
The port opens at once and answers /health with 503 until the model is loaded; then one line says where it is
served. SIGINT/SIGTERM stop new requests, give in-flight ones a grace period, end the rest with an error, stop the
core and exit 0. If the core process dies or reports itself unhealthy (its steps keep failing, or the device is
lost), open streams fail at once, /health answers 503, and the server shuts down and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

from nanokyro.config import EngineConfig
from nanokyro.tool_calls import FORMATS
from nanokyro.server import MAX_QUEUE, create_app
from nanokyro.uvicorn_server import KEEP_ALIVE_S, SHUTDOWN_GRACE_S, UvicornServer

log = logging.getLogger("nanokyro")


def parse_bytes(text: str) -> int:
    """'16777216', '512M', '4G' or '4GiB' -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 4G)")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def parse_args(argv=None) -> argparse.Namespace:
    d = EngineConfig()  # the engine's defaults are the CLI's
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory, .gguf file or Hub id; default: the embedded SmolLM2 GGUF")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=3000, help="port to listen on (default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"],
                   help="activation and KV dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most sequences in one running batch (default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget shared by decodes and prefill chunks (default %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="CUDA: fraction of GPU memory to fill with weights and KV cache (default %(default)s)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=d.kv_cache_memory,
                   help="KV-cache size in bytes (512M, 4G); the CPU default is 1 GiB, CUDA sizes it from free memory")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="longest prompt + completion in tokens; default: the model's own limit")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="answer 429 while more than this many requests await their first token (default %(default)s)")
    p.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S,
                   help="seconds an idle HTTP keep-alive connection stays open (default %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT (default %(default)s)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name",
                   help="model name clients send and see in /v1/models; default: taken from the model")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="dummy: random weights for an architecture name given as --model (e.g. qwen3-0.6b)")
    p.add_argument("--quantization", choices=["fp8", "awq"], default=None,
                   help="quantise full-precision weights at load: fp8 (per-channel) or awq (4-bit, groups of 128); "
                        "pre-quantised checkpoints (FP8, AWQ, compressed-tensors) are detected without it")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="ranks (GPUs) each layer is split over (default %(default)s)")
    p.add_argument("--pipeline-parallel-size", type=int, default=d.pipeline_parallel_size,
                   help="pipeline stages the layers are split into (default %(default)s)")
    p.add_argument("--speculative-model", help="speculative decoding: a draft model with the same tokenizer")
    p.add_argument("--speculative-method", choices=["draft", "ngram", "grammar"],
                   help="speculative decoding: draft (with --speculative-model), ngram (prompt lookup), or grammar "
                        "(structured outputs only, drafting the text their grammar forces; the others do that too)")
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens,
                   help="tokens proposed per speculative step (default %(default)s)")
    p.add_argument("--speculative-max-batch", type=int, default=d.speculative_max_batch,
                   help="speculate only while at most this many sequences run (default %(default)s)")
    p.add_argument("--speculative-draft-vocab", type=int, default=None,
                   help="speculative decoding: the draft scores only the first N token ids (a cheaper draft)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs or torch.compile")
    p.add_argument("--tool-call-parser", choices=sorted(FORMATS),
                   help="how the model writes tool calls (hermes: <tool_call> blocks; llama3_json: bare JSON objects); "
                        "default: picked from the chat template")
    p.add_argument("--export-tokenizer", metavar="DIR",
                   help="write the model's tokenizer (a GGUF's too) to DIR as an HF tokenizer directory and exit: "
                        "for tools that count tokens offline (guidellm, aiperf, lm-eval)")
    p.add_argument("--no-overlap-schedule", action="store_true",
                   help="run steps one at a time (by default the host handles a step's tokens while the next runs)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", type=parse_lora_module,
                   help="LoRA adapters (PEFT directories) to serve from the start; a request picks one with its "
                        "`model` field (NAME or BASE:NAME)")  # fmt: skip
    p.add_argument("--max-loras", type=int, default=None,
                   help="LoRA adapters resident on the device at once (more may be loaded; they are swapped in LRU). "
                        "Default: 4 with --lora-modules, else 0 (LoRA off; POST /v1/load_lora_adapter needs it on)")  # fmt: skip
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest adapter rank accepted")
    return p.parse_args(argv)


def parse_lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
        served_model_name=args.served_model_name, load_format=args.load_format, enforce_eager=args.enforce_eager,
        overlap_schedule=not args.no_overlap_schedule, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, quantization=args.quantization,
        lora_modules=dict(args.lora_modules),
        max_loras=args.max_loras if args.max_loras is not None else 4 if args.lora_modules else 0,
        max_lora_rank=args.max_lora_rank,
        speculative_model=args.speculative_model, speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_max_batch=args.speculative_max_batch, speculative_draft_vocab=args.speculative_draft_vocab,
    )  # fmt: skip


async def announce_when_ready(server: UvicornServer, url: str) -> None:
    """Log the one ready line once the port is open and the model loaded; stop if the model failed to load, or
    once the engine core dies or turns unhealthy (as vLLM's API server exits when its engine is dead)."""
    state = server.app_server
    while not (server.started and (state.client is not None or state.load_error is not None)):
        await asyncio.sleep(0.05)
    if state.load_error is not None:
        server.should_exit = True
        return
    state.client.on_dead.append(server.stop)
    if not state.client.healthy:  # it failed before the callback was in place
        server.stop()
        return
    log.info("serving %s at %s/v1", state.client.model_name, url)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = engine_config(args)
    if args.export_tokenizer:
        from nanokyro.loader import load_tokenizer  # torch: only here

        load_tokenizer(args.model).save(args.export_tokenizer)
        log.info("wrote the tokenizer of %s to %s", args.model or "the default model", args.export_tokenizer)
        return
    if int(os.environ.get("RANK", 0)) > 0:  # a torchrun rank > 0: no HTTP, only this rank's shard of rank 0's steps
        from nanokyro import parallel  # torch: only here, the frontend never loads it

        return parallel.serve_worker(cfg)
    # Rank 0 (or no torchrun): the HTTP frontend here; the engine core, rank 0 of the model, in its own process.
    app = create_app(cfg, api_key=args.api_key, max_queue=args.max_queue, tool_call_parser=args.tool_call_parser)
    server = UvicornServer(app, host=args.host, port=args.port, grace_s=args.shutdown_grace,
                           keep_alive_s=args.timeout_keep_alive)  # fmt: skip

    async def run() -> None:
        ready = asyncio.create_task(announce_when_ready(server, f"http://{args.host}:{args.port}"))
        try:
            await server.serve()
        finally:
            ready.cancel()

    asyncio.run(run())
    state = app.state.server
    if state.load_error is not None or (state.client is not None and state.client.error is not None):
        sys.exit(1)


if __name__ == "__main__":
    main()
