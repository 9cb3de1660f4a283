"""From the core's token ids to text: each completion's incremental detokeniser and its stop strings.

The server runs this in the frontend process and the offline `LLM` in its own, on the `SeqOutput`s of each step.
A stop string ends its completion here, where the text is; the caller then aborts that completion in the core,
which may meanwhile have produced a token or two more: those are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanokyro.request import Delta, SamplingParams, SeqOutput
from nanokyro.tokenizer import Detokenizer, Tokenizer


@dataclass
class _Request:
    detoks: list[Detokenizer | None]
    finished: list[bool]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        tok = self.tokenizer
        detoks = [Detokenizer(tok, prompt_ids, params.stop, params.skip_special_tokens) if tok else None
                  for _ in range(params.n)]  # fmt: skip
        self.requests[request_id] = _Request(detoks, [False] * params.n)

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, out: SeqOutput) -> tuple[Delta | None, bool]:
        """The text delta of one completion's output (None if that completion already ended here), and whether a
        stop string ended it just now (the caller aborts it in the core)."""
        req = self.requests.get(out.request_id)
        if req is None or req.finished[out.index]:
            return None, False
        detok, reason, token_ids = req.detoks[out.index], out.finish_reason, out.token_ids
        text, stopped = "", False
        if detok is not None:
            # The token that ends a "stop" (EOS, a stop token, a grammar's end) or an "abort" is not text.
            text_ids = token_ids[:-1] if reason in ("stop", "abort") else token_ids
            if len(text_ids) > 1 and detok.stop:  # several tokens (speculative decoding): find the one that stops
                for i, token in enumerate(text_ids):
                    piece, stopped = detok.add([token])
                    text += piece
                    if stopped:
                        token_ids = token_ids[: i + 1]  # the tokens after it are not part of the completion
                        break
            elif text_ids:
                text, stopped = detok.add(text_ids)
            if stopped:
                reason = "stop"
            if reason is not None:
                text += detok.flush()
        if reason is not None:
            req.finished[out.index] = True
            if all(req.finished):
                del self.requests[out.request_id]
        delta = Delta(out.request_id, out.index, text, token_ids, out.logprobs, reason, out.num_prompt_tokens,
                      out.num_cached_tokens, out.queue_time)  # fmt: skip
        return delta, stopped
