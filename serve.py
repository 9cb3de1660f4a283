"""Serve a model over the OpenAI-compatible HTTP API: `python serve.py [--model DIR|FILE.gguf|HUB_ID] [options]`.

The port opens at once and answers /health with 503 until the model is loaded; then one line says where it
is served. SIGINT/SIGTERM stop new connections, give in-flight requests a grace period, abort the rest, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys

import uvicorn

from nanokyro import parallel
from nanokyro.config import EngineConfig
from nanokyro.engine import AsyncEngine
from nanokyro.server import MAX_QUEUE, SHUTDOWN_GRACE_S, create_app

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
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name",
                   help="model name clients send and see in /v1/models; default: taken from the model")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="dummy: random weights for an architecture name given as --model (e.g. qwen3-0.6b)")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="ranks (GPUs) each layer is split over (default %(default)s)")
    p.add_argument("--pipeline-parallel-size", type=int, default=d.pipeline_parallel_size,
                   help="pipeline stages the layers are split into (default %(default)s)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs or torch.compile")
    p.add_argument("--no-overlap-schedule", action="store_true",
                   help="run steps one at a time (by default the host handles a step's tokens while the next runs)")
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
        served_model_name=args.served_model_name, load_format=args.load_format, enforce_eager=args.enforce_eager,
        overlap_schedule=not args.no_overlap_schedule, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )  # fmt: skip


async def announce_when_ready(server: uvicorn.Server, state, url: str) -> None:
    """Log the one ready line once the port is open and the model loaded; stop if the model failed to load."""
    while not (server.started and (state.engine is not None or state.load_error is not None)):
        await asyncio.sleep(0.05)
    if state.load_error is not None:
        server.should_exit = True
    else:
        log.info("serving %s at %s/v1", state.engine.model_name, url)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = engine_config(args)
    if parallel.torchrun_rank():  # a torchrun rank > 0: no HTTP, only this rank's shard of rank 0's steps
        return parallel.serve_worker(cfg)
    app = create_app(lambda: AsyncEngine(cfg), api_key=args.api_key, max_queue=args.max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))  # fmt: skip

    async def run() -> None:
        ready = asyncio.create_task(announce_when_ready(server, app.state.server, f"http://{args.host}:{args.port}"))
        try:
            await server.serve()
        finally:
            ready.cancel()

    # uvicorn shuts down gracefully on the signal and then raises it again: exit 0 rather than die of it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    if app.state.server.load_error is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
