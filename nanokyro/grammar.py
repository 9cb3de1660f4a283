"""Constrained decoding through xgrammar: a request's `StructuredOutput` (request.py) as a compiled grammar,
one `GrammarMatcher` per constrained sequence, and the step's token bitmask.

The flow: `EngineCore.validate` compiles the spec before the request is queued (outside the step loop, so a new
schema never stalls other requests), raising ValueError that names what is wrong; `add_request` gives each of the
n sequences a matcher of its own; each step the sampler fills the constrained rows of one reusable bitmask and
masks their logits; the engine advances each matcher with its sampled token and finishes the sequence ("stop")
once the matcher has accepted a stop token at the end of the grammar.

Speculative decoding (spec_decode.py) drafts what a grammar forces and verifies drafts under the grammar: `forced_text`
and `draft_bitmasks` look ahead of a matcher and roll it back, so its state is what the accepted tokens made it.
"""
from __future__ import annotations

import functools
import json
import re
import threading

import numpy as np
import torch
import xgrammar as xgr
from xgrammar import GrammarMatcher

from nanokyro.request import StructuredOutput
from nanokyro.tokenizer import Tokenizer

# Compiled grammars are cached by xgrammar under their source text; this bounds what a stream of distinct
# schemas can hold.
CACHE_LIMIT_BYTES = 256 << 20


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices. JSON string escapes (\\", \\\\, \\n, \\uXXXX) are GBNF's too."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _schema_text(schema: dict | str) -> str:
    """A schema as JSON text, the compiler's cache key. Keys keep their order: properties are generated in it."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid json schema: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"invalid json schema: a schema is a JSON object, got {type(schema).__name__}")
    return json.dumps(schema)


@functools.lru_cache(maxsize=256)  # the same tools come again and again; converting a schema takes milliseconds
def _compact_schemas(structural_tag: str) -> str:
    """The structural tag with each JSON schema inside it as its compact grammar, as JSON outputs are compiled."""
    try:
        tag = json.loads(structural_tag)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid structural tag: not valid JSON ({e})") from None

    def compact(node):
        if isinstance(node, list):
            return [compact(x) for x in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") == "json_schema" and "json_schema" in node:
            schema = xgr.Grammar.from_json_schema(_schema_text(node["json_schema"]), any_whitespace=False)
            return {"type": "grammar", "grammar": str(schema)}
        return {k: compact(v) for k, v in node.items()}

    return json.dumps(compact(tag))


class GrammarCompiler:
    """Compiles StructuredOutput specs against one model's tokenizer and vocabulary; safe to call from any thread.

    vocab_size is the model's (its logits' width), which may exceed the tokenizer's: the extra ids are never
    allowed. stop_token_ids end a completed grammar; the engine finishes the sequence when one is accepted.
    """

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _xgr(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                # Built on first use: decoding a 50k-token vocabulary takes ~0.5 s that unconstrained serving skips.
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer; this model has none (dummy weights)")
                from transformers import PreTrainedTokenizerFast  # xgrammar depends on transformers already

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.tokenizer)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)  # fmt: skip
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The spec's grammar (cached). Raises ValueError naming the problem in an invalid schema/regex/grammar."""
        compiler = self._xgr()
        kind = spec.kind
        try:
            # Compact JSON (no free whitespace): models, random ones above all, can emit whitespace forever.
            if spec.json is True:
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=False)
            if kind == "json":
                return compiler.compile_json_schema(_schema_text(spec.json), any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "grammar":
                return compiler.compile_grammar(spec.grammar)
            if kind == "structural_tag":
                return compiler.compile_structural_tag(_compact_schemas(spec.structural_tag))
            return compiler.compile_grammar(choice_grammar(spec.choice))
        except RuntimeError as e:  # xgrammar's parse errors: "[time] file.cc:line: what is wrong"
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()
            what = {"json": "json schema", "structural_tag": "structural tag (of the tools' parameter schemas)"}
            raise ValueError(f"invalid {what.get(kind, kind)}: {reason}") from None

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec))


def accept_tokens(matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
    """Advance each matcher by its sampled token in one call (not one Python call per row); False = rejected."""
    return xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens) if matchers else []


class TokenBitmask:
    """The step's allowed tokens for constrained rows: one host int32 buffer [rows, ceil(vocab / 32)], grown to the
    largest batch seen and reused, filled for the constrained rows only and applied to their logits in place."""

    def __init__(self):
        self.host: torch.Tensor | None = None
        self._filler: xgr.BatchGrammarMatcher | None = None  # fills many matchers' rows on a thread pool
        self._copied: torch.cuda.Event | None = None  # recorded after the buffer's last copy to the device

    def apply(self, logits: torch.Tensor, matchers: list[GrammarMatcher | None]) -> None:
        """logits [num_rows, vocab]; matchers[i] constrains row i, None leaves it untouched."""
        num_rows, vocab = logits.shape
        if self.host is None or self.host.shape[0] < num_rows or self.host.shape[1] * 32 < vocab:
            self.host = xgr.allocate_token_bitmask(num_rows, vocab)
            if logits.device.type == "cuda":
                self.host = self.host.pin_memory()
            self._filler = self._filler or xgr.BatchGrammarMatcher()
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if self._copied is not None:  # the buffer's last copy to the device must be done before it is refilled
            self._copied.synchronize()
        self._filler.batch_fill_next_token_bitmask([matchers[i] for i in rows], self.host, rows)
        mask = self.host[:num_rows].to(logits.device, non_blocking=True)  # from pinned memory: no stream sync
        if logits.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)


def forced_text(matcher: GrammarMatcher) -> str:
    """The longest text the grammar allows next and nothing else (a JSON key with its quotes, a closing bracket);
    "" when the next character is free. Leaves the matcher as it is."""
    return matcher.find_jump_forward_string()


def only_allowed(row: torch.Tensor) -> int | None:
    """The token a bitmask row [ceil(vocab / 32)] int32 allows, if it allows exactly one."""
    words = row.numpy()
    nonzero = np.flatnonzero(words)
    if len(nonzero) != 1:
        return None
    word = int(words[nonzero[0]]) & 0xFFFFFFFF  # bit 31 makes the int32 negative
    return int(nonzero[0]) * 32 + word.bit_length() - 1 if word & (word - 1) == 0 else None


def draft_bitmasks(matcher: GrammarMatcher, drafts: list[int], k: int, vocab_size: int
                   ) -> tuple[list[int], int, torch.Tensor]:  # fmt: skip
    """The grammar's allowed tokens at each position a verify step scores for these drafts: row j of the mask
    [len(kept) + 1, ceil(vocab / 32)] is the grammar's state after kept[:j]. Drafts stop before the first one the
    grammar rejects. While there are fewer than k and the last position allows exactly one token, that token is
    drafted too (the stop token after a finished JSON object, say). Returns (kept drafts and the forced ones after
    them, how many were kept of `drafts`, the mask). The matcher is rolled back: its state is unchanged."""
    mask = xgr.allocate_token_bitmask(k + 1, vocab_size)
    tokens, kept = [], 0
    for j in range(k + 1):
        if matcher.is_terminated():  # after a stop token: nothing follows, and the row after it is never used
            mask[j] = -1
            break
        matcher.fill_next_token_bitmask(mask, j)
        if j == k:
            break
        if kept == j < len(drafts) and matcher.accept_token(drafts[j]):
            tokens.append(drafts[j])
            kept += 1
            continue
        token = only_allowed(mask[j])  # past the drafts, or in place of one the grammar rejected
        if token is None or not matcher.accept_token(token):
            break
        tokens.append(token)
    matcher.rollback(len(tokens))
    return tokens, kept, mask[: len(tokens) + 1]


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
    """Mask logits[rows[i]] in place to the tokens mask[i] (host int32 [len(rows), ceil(vocab / 32)]) allows."""
    full = torch.full((logits.shape[0], mask.shape[1]), -1, dtype=torch.int32)
    full[rows] = mask
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), vocab_size=logits.shape[-1],
                                    indices=rows)  # fmt: skip
