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
import sys

from nanokyro.cli import add_engine_args, engine_kwargs
from nanokyro.config import EngineConfig
from nanokyro.tool_calls import FORMATS
from nanokyro.server import MAX_QUEUE, create_app
from nanokyro.uvicorn_server import KEEP_ALIVE_S, SHUTDOWN_GRACE_S, UvicornServer

log = logging.getLogger("nanokyro")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory, .gguf file or Hub id; default: the embedded SmolLM2 GGUF")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=3000, help="port to listen on (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="answer 429 once this many requests await their first token (default %(default)s)")
    p.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S,
                   help="seconds an idle HTTP keep-alive connection stays open (default %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT (default %(default)s)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes, /tokenize and /detokenize")
    p.add_argument("--served-model-name",
                   help="model name clients send and see in /v1/models; default: taken from the model")
    p.add_argument("--tool-call-parser", choices=sorted(FORMATS),
                   help="how the model writes tool calls (hermes: <tool_call> blocks; llama3_json: bare JSON objects); "
                        "default: picked from the chat template")
    p.add_argument("--export-tokenizer", metavar="DIR",
                   help="write the model's tokenizer (a GGUF's too) to DIR as an HF tokenizer directory and exit: "
                        "for tools that count tokens offline (guidellm, aiperf, lm-eval)")
    add_engine_args(p)
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, served_model_name=args.served_model_name, **engine_kwargs(args))


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
