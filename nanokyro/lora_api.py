"""vLLM's LoRA admin endpoints, POST /v1/load_lora_adapter and /v1/unload_lora_adapter: the engine core loads or
unloads the adapter between its steps and replies with the outcome, which becomes the HTTP answer. A bad adapter is
a 400 naming what is wrong, an unknown one a 404, one that unfinished requests use a 409."""
from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Request, Response, post
from litestar.params import JSONBody

from nanokyro.api_errors import APIError, engine_error, strict
from nanokyro.client import EngineDead
from nanokyro.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

if TYPE_CHECKING:
    from nanokyro.server import _Server


def routes(server: _Server) -> list:
    """The two route handlers, over the app's shared state; server.py mounts them under /v1."""

    @post("/load_lora_adapter", status_code=200)
    async def load_lora_adapter(data: JSONBody[LoadLoRAAdapterRequest], request: Request) -> Response:
        return await change_adapter(server, request, load=True)

    @post("/unload_lora_adapter", status_code=200)
    async def unload_lora_adapter(data: JSONBody[UnloadLoRAAdapterRequest], request: Request) -> Response:
        return await change_adapter(server, request, load=False)

    return [load_lora_adapter, unload_lora_adapter]


async def change_adapter(server: _Server, request: Request, load: bool) -> Response:
    """Load (load=True, from the request's lora_path) or unload the adapter the request names."""
    client = server.ready_client()
    if load:
        req = await strict(request, LoadLoRAAdapterRequest)
        if not client.max_loras:
            raise APIError(400, "LoRA is off: start the server with --max-loras N (or --lora-modules)")
        if req.lora_name == client.model_name:
            raise APIError(400, f"lora_name {req.lora_name!r} is the base model's name", param="lora_name")
    else:
        req = await strict(request, UnloadLoRAAdapterRequest)
    try:
        reply = await client.change_adapter(req.lora_name, req.lora_path if load else None)
    except EngineDead as e:
        raise engine_error(e) from None
    if reply.status != 200:
        param = "lora_path" if reply.status == 400 and "lora_name" not in reply.message else "lora_name"
        code = {404: "model_not_found", 409: "adapter_in_use"}.get(reply.status)
        raise APIError(reply.status, reply.message, param=param, code=code)
    done = "added" if load else "removed"
    return Response(f"Success: LoRA adapter '{req.lora_name}' {done} successfully.", media_type="text/plain")
