"""vLLM's tokenizer endpoints, POST /tokenize and /detokenize: the ids a prompt becomes, or a chat's messages as the
chat endpoint renders them, and the text of token ids, by the model's own tokenizer in the frontend process. A
request's `model` may name the base model or one of its LoRA adapters, which share its tokenizer."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import jinja2
import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from nanokyro.api_errors import APIError, strict
from nanokyro.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from nanokyro.request import PromptError

if TYPE_CHECKING:
    from nanokyro.client import CoreClient
    from nanokyro.server import _Server


def routes(server: _Server) -> list:
    """The two route handlers, over the app's shared state; server.py mounts them where vLLM serves them."""

    @post("/tokenize", status_code=200)
    async def tokenize(data: JSONBody[TokenizeRequest], request: Request) -> TokenizeResponse:
        return await _tokenize(server, await strict(request, TokenizeRequest))

    @post("/detokenize", status_code=200)
    async def detokenize(data: JSONBody[DetokenizeRequest], request: Request) -> DetokenizeResponse:
        return await _detokenize(server, await strict(request, DetokenizeRequest))

    return [tokenize, detokenize]


def _tokenizer_client(server: _Server, model: str | None) -> CoreClient:
    client = server.ready_client()
    if model is not None:
        server.lora_of(client, model)  # an adapter shares the base model's tokenizer; anything else is a 404
    if client.tokenizer is None:
        raise APIError(400, "this model has no tokenizer (dummy weights)")
    return client


async def _tokenize(server: _Server, req: TokenizeRequest) -> TokenizeResponse:
    client = _tokenizer_client(server, req.model)
    tokenizer = client.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    try:
        if req.prompt is not None:
            server.check_length(len(req.prompt))
            add_special_tokens = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt, add_special_tokens)
        else:
            messages = [msgspec.to_builtins(m) for m in req.messages]
            tools = msgspec.to_builtins(req.tools) if req.tools else None
            server.check_length(len(msgspec.json.encode([messages, tools])))
            ids = await asyncio.to_thread(_tokenize_chat, tokenizer, messages, req.add_generation_prompt, tools,
                                          bool(req.add_special_tokens))  # fmt: skip
    except PromptError as e:
        raise APIError(400, str(e), param="prompt" if req.prompt is not None else "messages") from None
    except (ValueError, jinja2.TemplateError) as e:
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    strs = [tokenizer.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None  # as vLLM
    return TokenizeResponse(len(ids), client.limits.max_model_len, ids, strs)


def _tokenize_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                   add_special_tokens: bool) -> list[int]:  # fmt: skip
    """The ids the chat endpoint would give the model; with add_special_tokens, the rendered text encoded with
    them (vLLM's option, which may double a BOS the template wrote)."""
    if add_special_tokens:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt, tools=tools)
        return tokenizer.encode(text, add_special_tokens=True)
    return tokenizer.encode_chat(messages, add_generation_prompt, tools=tools)


async def _detokenize(server: _Server, req: DetokenizeRequest) -> DetokenizeResponse:
    tokenizer = _tokenizer_client(server, req.model).tokenizer
    bad = [i for i in req.tokens if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                       param="tokens")  # fmt: skip
    return DetokenizeResponse(await asyncio.to_thread(tokenizer.decode, req.tokens, False))
