"""Text in and out: the HF tokenizer, the chat template, and incremental detokenisation.

`Tokenizer` wraps a `tokenizers.Tokenizer` with what serving needs from an HF tokenizer directory: the BOS/EOS
ids, the chat template (rendered with jinja2 the way `transformers` renders it), and BOS handling for chat prompts.
`Detokenizer` turns one completion's stream of token ids into text deltas that never split a UTF-8 character and
never leak a stop string, in O(window) work per step.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.meta
import msgspec
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanokyro.tool_calls import FORMATS, format_for_template, prepare_messages

# Used when a model ships no chat template: plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Prompt tokens decoded in front of the first output tokens: enough for a SentencePiece tokenizer to see that the
# output does not start the text (so its leading space survives) and for a split character to be re-joined.
PROMPT_CONTEXT = 5
LONG_TEXT = 4096  # characters from which encoding releases the GIL


class TokenizerSpec(msgspec.Struct):
    """Everything a Tokenizer is made of, as plain data: how the engine core hands its tokenizer to the frontend."""

    json: str  # tokenizers' own serialisation
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos_token: bool | None


class Tokenizer:
    """A model's tokenizer: encode/decode, its EOS ids, and its chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: list[int] = (), add_bos_token: bool | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = _unique([*eos_token_ids, *([eos_id] if eos_id is not None else [])])
        # Special added tokens: dropped by decode(skip_special_tokens=True), and by the Detokenizer before windowing.
        self.special_token_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        # An explicit add_bos_token (GGUF metadata carries one) overrides the post-processor; None trusts it.
        self.add_bos_token = add_bos_token
        self._adds_bos = self.bos_token_id is not None and (
            add_bos_token if add_bos_token is not None
            else tokenizer.encode("", add_special_tokens=True).ids[:1] == [self.bos_token_id])
        self.chat_template = chat_template
        env = _jinja_env()
        self._template = env.from_string(chat_template or CHATML_TEMPLATE)
        # A template that reads `tools` renders tool definitions, calls and results itself; others are given them
        # as text (tool_calls.prepare_messages).
        self.template_takes_tools = "tools" in jinja2.meta.find_undeclared_variables(
            env.parse(chat_template or CHATML_TEMPLATE))
        self.tool_format = format_for_template(chat_template)  # how this model writes tool calls

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: list[int] = ()) -> "Tokenizer":
        """Load an HF tokenizer directory (tokenizer.json + tokenizer_config.json, optional chat_template.jinja and
        generation_config.json)."""
        tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        _add_missing_tokens(tok, config.get("added_tokens_decoder", {}))
        gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        # The config's add_bos_token is not read: like transformers 5, the tokenizer.json post-processor decides.
        return cls(tok, chat_template=_read_chat_template(path, config),
                   bos_token=_token_str(config.get("bos_token")), eos_token=_token_str(config.get("eos_token")),
                   eos_token_ids=[*eos_token_ids, *(gen_eos or [])])

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(spec.json), chat_template=spec.chat_template,
                   bos_token=spec.bos_token, eos_token=spec.eos_token, eos_token_ids=spec.eos_token_ids,
                   add_bos_token=spec.add_bos_token)  # fmt: skip

    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.tokenizer.to_str(), self.chat_template, self.bos_token, self.eos_token,
                             self.eos_token_ids, self.add_bos_token)  # fmt: skip

    def save(self, path: str) -> None:
        """Write an HF tokenizer directory (tokenizer.json, tokenizer_config.json with the chat template, and the EOS
        ids in generation_config.json) that `from_dir` and transformers' AutoTokenizer load: how a GGUF model's
        tokenizer reaches tools that count tokens offline (guidellm, aiperf, lm-eval)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "chat_template": self.chat_template}  # fmt: skip
        _write_json(os.path.join(path, "tokenizer_config.json"), {k: v for k, v in config.items() if v is not None})
        _write_json(os.path.join(path, "generation_config.json"), {"eos_token_id": self.eos_token_ids})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_bos_token is None:
            return self._encode(text, add_special_tokens)
        ids = self._encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens and self._adds_bos else ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode() holds the GIL for all of its work; encode_batch() releases it, so a long prompt tokenised on a
        # worker thread does not stall the server's event loop (3 s for 3 MB). Short texts skip its thread pool.
        if len(text) < LONG_TEXT:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, tool_format: str | None = None, **kwargs) -> str:
        """Render a conversation to the prompt string. tools: OpenAI function tools the model may call; assistant
        tool_calls and role "tool" messages in the history render too, through the template where it knows them,
        else as text in tool_format (default: the template's). Extra kwargs (enable_thinking, ...) reach the
        template as variables."""
        fmt = FORMATS[tool_format or self.tool_format]
        messages = prepare_messages([_plain_message(m) for m in messages], tools, fmt, self.template_takes_tools)
        if tools and self.template_takes_tools:
            kwargs["tools"] = tools
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Prompt ids for a conversation with exactly one BOS where the model wants one: most templates write the
        BOS themselves (encoding with special tokens would double it), a few rely on the tokenizer to add it.
        kwargs: as apply_chat_template's."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self._encode(text, add_special_tokens=False)
        if self._adds_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


class Detokenizer:
    """Incremental, UTF-8 safe text for one completion, with stop strings.

    Each step decodes only a short window of ids: its first `read` ids were decoded in the previous window (their
    text is the left context, and was emitted then), the rest are new. What decoding the whole window adds beyond
    the context is the new text. A trailing U+FFFD there is a multi-byte character whose remaining bytes are still
    to come: the text before it is emitted, and the window keeps its place until the character is complete; then
    the window slides so that the ids just decoded become the next one's context.

    The streamed text equals decoding all the ids, with one exception: the ByteFallback decoder turns a whole run
    of <0xNN> tokens into U+FFFDs when any byte in it is invalid, including the valid characters before that byte,
    which a stream has already emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer, self.stop, self.skip_special_tokens = tokenizer, [s for s in stop if s], skip_special_tokens
        # Skipped special tokens decode to nothing; dropping them keeps real text as the window's left context.
        self._ids = self._keep(prompt_ids[-4 * PROMPT_CONTEXT:])[-PROMPT_CONTEXT:]  # the prompt's tail is enough
        self._read = len(self._ids)
        self._sent = 0  # characters of the current window's new text already passed on
        self._pending = ""  # text held back because it could be the start of a stop string
        self.text = ""
        self.stopped = self._finished = False

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Feed newly generated ids; returns (text now safe to emit, stopped)."""
        if self._finished or self.stopped:
            return "", self.stopped
        self._ids += self._keep(token_ids)
        new_text = self._new_text()
        complete = new_text.rstrip("\ufffd")
        delta = complete[self._sent:]
        self._sent += len(delta)
        if new_text and complete == new_text:  # text, and no character left open: slide the window
            self._ids, self._read, self._sent = self._ids[self._read:], len(self._ids) - self._read, 0
        return self._emit(delta, final=False), self.stopped

    def flush(self) -> str:
        """At finish (length, EOS, abort): release everything held back, up to a stop string."""
        if self._finished or self.stopped:
            return ""
        self._finished = True
        return self._emit(self._new_text()[self._sent:], final=True)

    def _new_text(self) -> str:
        skip = self.skip_special_tokens
        context = self.tokenizer.decode(self._ids[:self._read], skip_special_tokens=skip)
        # Decoding with the context in front matters: SentencePiece decoders drop the leading space of a text's
        # first word, and a character's bytes may begin in the context.
        return self.tokenizer.decode(self._ids, skip_special_tokens=skip)[len(context):]

    def _keep(self, ids: list[int]) -> list[int]:
        special = self.tokenizer.special_token_ids
        return [i for i in ids if i not in special] if self.skip_special_tokens else list(ids)

    def _emit(self, delta: str, final: bool) -> str:
        # A stop string can only begin inside the held-back text or the delta: anything earlier was emitted
        # because no stop string could start there.
        buf = self._pending + delta
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = buf[:cut], "", True
        else:
            hold = 0 if final else _partial_stop_len(buf, self.stop)
            out, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out


def _partial_stop_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # The same sandbox and helpers as transformers, so Hub templates render identically.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _plain_message(message: dict) -> dict:
    # OpenAI clients send content=None next to tool_calls, and content as a list of parts; templates expect
    # a missing key and a string. Parts are separate blocks, so they are joined by a newline.
    message = {k: v for k, v in message.items() if v is not None}
    if isinstance(message.get("content"), list):
        message["content"] = "\n".join(p["text"] for p in message["content"] if p.get("type") == "text")
    return message


def _read_chat_template(path: str, config: dict) -> str | None:
    # transformers 5 writes the template to chat_template.jinja; older dirs keep it in tokenizer_config.json,
    # either as a string or as a list of named templates of which "default" is the chat one.
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path) as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _add_missing_tokens(tok: tokenizers.Tokenizer, added_tokens_decoder: dict) -> None:
    # tokenizer.json normally holds every added token already; older configs listed some only here.
    for _, t in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
        if tok.token_to_id(t["content"]) is None:
            added = tokenizers.AddedToken(t["content"], single_word=t.get("single_word", False),
                                          lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False),
                                          normalized=t.get("normalized", False), special=t.get("special", False))
            tok.add_tokens([added])


def _token_str(token) -> str | None:
    # Special tokens are saved either as plain strings or as serialized AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))

