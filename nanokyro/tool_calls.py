"""Function calling: how a model is told about tools, what a tool_choice lets it write, and its tool calls read back
out of its text.

A model writes tool calls in the format it was trained on (a `ToolFormat`): Hermes-style `<tool_call>{"name": ..,
"arguments": {..}}</tool_call>` blocks (Qwen2.5, and what a template without tools support is taught here), or
Llama-3.1's bare `{"name": .., "parameters": {..}}` objects. The format is picked from the chat template.

- `prepare_messages` makes a conversation renderable: a template that takes `tools` gets the history with each
  call's arguments as an object; any other template gets the tools as a system message and the calls and their
  results as text in the format.
- `ToolUse.grammar` is what a tool_choice imposes, as an xgrammar structural tag over the functions' schemas:
  "required" and a named function admit nothing but calls; "auto" admits any text, but once the model opens a call,
  the call must name a tool and its arguments must match that tool's schema.
- `ToolCallParser` turns a completion's text, fed in pieces as it streams, into content and tool-call deltas.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # what starts a call; "" for a format whose calls are bare JSON objects at the start of the text
    close: str
    args_key: str  # the key the arguments object is under
    separator: str  # between parallel calls

    def call_text(self, name: str, arguments: dict | str) -> str:
        """One call as the model writes it."""
        args = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else arguments
        return f'{self.open}{{"name": {json.dumps(name, ensure_ascii=False)}, "{self.args_key}": {args}}}{self.close}'


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n"),
    "llama3_json": ToolFormat("llama3_json", "", "", "parameters", "; "),
}


def format_for_template(template: str | None) -> str:
    """The tool-call format a chat template's model writes: Llama 3.1's templates mention its <|python_tag|>;
    Qwen2.5's (and any template this does not know, which gets taught Hermes) use <tool_call> blocks."""
    if template and "<|python_tag|>" in template and "<tool_call>" not in template:
        return "llama3_json"
    return "hermes"


@dataclass
class ToolUse:
    """A chat request's tools (OpenAI's `{"type": "function", "function": {...}}` objects) and what it lets the
    model do with them. choice: "none", "auto", "required" or a function's name."""

    tools: list[dict]
    choice: str
    parallel: bool
    format: ToolFormat

    @classmethod
    def from_request(cls, tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool | None,
                     format_name: str) -> ToolUse | None:  # fmt: skip
        """None when the request has no tools. Raises ValueError("param: problem") for an inconsistent request."""
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice["function"]["name"]
        if not tools:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice: a tool_choice other than none needs tools")
            return None
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        choice = tool_choice or "auto"
        if choice not in ("none", "auto", "required") and choice not in names:
            raise ValueError(f"tool_choice: the function {choice!r} is not among the tools {names}")
        return cls(tools, choice, parallel is not False, FORMATS[format_name])

    @property
    def calls_expected(self) -> bool:
        return self.choice != "none"

    def prompt_tools(self) -> list[dict] | None:
        """The tools the prompt shows the model: none for tool_choice none (it is not to call any)."""
        return self.tools if self.choice != "none" else None

    def grammar(self) -> str | None:
        """What tool_choice allows the model to write, as an xgrammar structural tag (JSON text; the engine
        compiles it, each schema compactly), or None for "none"."""
        if self.choice == "none":
            return None
        chosen = [t["function"] for t in self.tools if self.choice in ("auto", "required", t["function"]["name"])]
        tags = [_tag(self.format, f) for f in chosen]
        # A named function: exactly one call; required: one or more (one without parallel_tool_calls).
        once = not self.parallel or self.choice not in ("auto", "required")
        if self.choice == "auto":
            # Free text until the model opens a call; from there on the call follows a schema.
            trigger = self.format.open.strip() or '{"name": '
            fmt = {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "stop_after_first": once}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": self.format.separator,
                   "at_least_one": True, "stop_after_first": once}  # fmt: skip
        return json.dumps({"type": "structural_tag", "format": fmt})


def _tag(fmt: ToolFormat, function: dict) -> dict:
    """One function's call as a structural tag: fixed text up to the arguments, which follow the schema. (The
    engine leaves out properties the schema does not name, so what is written always validates.)"""
    schema = function.get("parameters") or {"type": "object"}
    begin, end = fmt.call_text(function["name"], "\0").split("\0")
    return {"type": "tag", "begin": begin, "content": {"type": "json_schema", "json_schema": schema}, "end": end}


# -- the prompt --------------------------------------------------------------------------------------------------


def prepare_messages(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat, native: bool) -> list[dict]:
    """The conversation a template can render. native: the template takes `tools` and renders tool calls and
    results itself (it gets each call's arguments as an object, as HF templates expect); otherwise tool
    definitions become a system message and calls and results become text in the format."""
    if native:
        return [_arguments_as_objects(m) for m in messages]
    out = [_as_text(m, fmt) for m in messages]
    if tools:
        prompt = tools_prompt(tools, fmt)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{_text(out[0].get('content'))}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def tools_prompt(tools: list[dict], fmt: ToolFormat) -> str:
    """The system-message text that tells a model without a tools-aware template about the tools."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = fmt.call_text("<function name>", "<arguments as a JSON object>")
    return ("These tools are available. Each is a function described by a JSON schema of its arguments:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            f"To call one, answer with a call written exactly like this (one per call):\n{example}")  # fmt: skip


def _arguments_as_objects(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [{**c, "function": {**c["function"], "arguments": _args_object(c)}}
                                      for c in calls]}  # fmt: skip


def _args_object(call: dict) -> dict | str:
    args = call["function"].get("arguments", "{}")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args  # not JSON: rendered as the client sent it
    return parsed if isinstance(parsed, dict) else args


def _as_text(message: dict, fmt: ToolFormat) -> dict:
    role = message.get("role")
    if role == "assistant" and message.get("tool_calls"):
        calls = fmt.separator.join(fmt.call_text(c["function"]["name"], _args_object(c)) for c in message["tool_calls"])
        content = _text(message.get("content"))
        return {"role": "assistant", "content": f"{content}\n{calls}" if content else calls}
    if role == "tool":  # a tool's result, handed back in a user turn (roles other templates refuse)
        return {"role": "user", "content": f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"}
    return message


def _text(content) -> str:
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if p.get("type") == "text")
    return content or ""


# -- reading calls back ------------------------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(text: str) -> dict | None:
    """A call's JSON as {"name", "arguments" (JSON text)}, or None if it is not a call."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return _call_from(obj)


def _call_from(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


# The fixed start of a Hermes call, up to its arguments object: from here the arguments can stream.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass
class ToolCallParser:
    """A completion's text, fed as it streams, as content and tool-call deltas. feed() and finish() return
    (content to emit, deltas); a delta is {"index", "id", "type", "function": {"name", "arguments"}} with only
    what is new: a call's first delta names it, later ones carry pieces of its arguments, as OpenAI streams them.
    A Hermes call streams its arguments as they are written (held back only where they could be the call's own
    closing); a bare-JSON call comes whole once its object is complete. Text that looks like a call but is not
    one (bad JSON, no name) is passed on as content."""

    format: ToolFormat
    num_calls: int = 0
    _buf: str = ""  # text held back: a possible start of a call, or a call still being written
    _in_call: bool = False
    _decided: bool = False  # bare-JSON formats: whether the text starts with a call (then it is calls only)
    _streaming: dict | None = None  # the call whose arguments are streaming: index, where they start, chars sent
    _calls: list = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buf += text
        content = self._tagged() if self.format.open else self._bare(final=False)
        return self._content(content), self._take_calls()

    def finish(self) -> tuple[str, list[dict]]:
        if self.format.open:
            content = self._tagged()
            body = self._buf[len(self.format.open.strip()):]
            if self._streaming is not None:  # cut off mid-call (by max_tokens): what was written is what there is
                self._stream_arguments(body, final=True)
            elif self._in_call:  # a call left open at the end (the model stopped before its closing tag)
                call = _call(body.strip())
                content += "" if call and self._add(call) else self._buf
            else:
                content += self._buf
        else:
            content = self._bare(final=True)
        self._buf, self._streaming = "", None
        return self._content(content), self._take_calls()

    def _tagged(self) -> str:
        open_, close = self.format.open.strip(), self.format.close.strip()
        content = ""
        while True:
            if not self._in_call:
                i = self._buf.find(open_)
                if i < 0:
                    hold = _partial_suffix(self._buf, open_)
                    content += self._buf[:len(self._buf) - hold]
                    self._buf = self._buf[len(self._buf) - hold:]
                    return content
                content, self._buf, self._in_call = content + self._buf[:i], self._buf[i:], True
            j = self._buf.find(close)
            body = self._buf[len(open_):j if j >= 0 else len(self._buf)]
            if self._streaming is None and (head := _CALL_HEAD.match(body)):
                self._calls.append({"index": self.num_calls, "id": new_call_id(), "type": "function",
                                    "function": {"name": json.loads(head[1]), "arguments": ""}})  # fmt: skip
                self._streaming = {"index": self.num_calls, "start": head.end(), "sent": 0}
                self.num_calls += 1
            if j < 0:
                if self._streaming is not None:
                    self._stream_arguments(body, final=False)
                return content
            if self._streaming is not None:
                self._stream_arguments(body, final=True)
                self._streaming = None
            elif not ((call := _call(body.strip())) and self._add(call)):
                content += self._buf[:j + len(close)]
            self._buf, self._in_call = self._buf[j + len(close):], False

    def _stream_arguments(self, body: str, final: bool) -> None:
        """Send the arguments written since the last piece. The call's own closing brace (and, mid-stream, any
        trailing brace or whitespace that may be it, or the start of the closing tag) is held back."""
        args = body[self._streaming["start"]:].rstrip()
        if final:
            args = args.removesuffix("}").rstrip()
        else:
            args = args[:len(args) - _partial_suffix(args, self.format.close.strip())].rstrip("} \n\t\r")
        piece = args[self._streaming["sent"]:]
        if piece:
            self._calls.append({"index": self._streaming["index"], "function": {"arguments": piece}})
            self._streaming["sent"] = len(args)

    def _bare(self, final: bool) -> str:
        if not self._decided:
            start = self._buf.lstrip()
            if not start and not final:
                return ""
            self._decided, self._in_call = True, start.startswith(("{", "<|python_tag|>"))
            if self._in_call:
                self._buf = start.removeprefix("<|python_tag|>")
        if not self._in_call:
            content, self._buf = self._buf, ""
            return content
        decoder = json.JSONDecoder()
        while True:  # complete objects, separated by ";" and whitespace
            rest = self._buf.lstrip("; \n\t")
            try:
                obj, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                break
            call = _call_from(obj)
            if call is None:
                break
            self._add(call)
            self._buf = rest[end:]
        if final:
            content, self._buf = self._buf if self._buf.strip() else "", ""
            return content
        return ""

    def _add(self, call: dict) -> bool:
        self._calls.append({"index": self.num_calls, "id": new_call_id(), "type": "function", "function": call})
        self.num_calls += 1
        return True

    def _take_calls(self) -> list[dict]:
        calls, self._calls = self._calls, []
        return calls

    def _content(self, content: str) -> str:
        # Whitespace around and between calls is layout, not content.
        return "" if self.num_calls and not content.strip() else content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def merge(deltas: list[dict]) -> list[dict]:
    """Tool-call deltas put together into whole calls, as a client does: fields by index, arguments appended."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"index": d["index"], "function": {"name": "", "arguments": ""}})
        call.update({k: d[k] for k in ("id", "type") if k in d})
        call["function"]["name"] += d["function"].get("name") or ""
        call["function"]["arguments"] += d["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def parse(text: str, fmt: ToolFormat) -> tuple[str | None, list[dict]]:
    """A whole completion as (content or None, whole calls)."""
    parser = ToolCallParser(fmt)
    content, deltas = parser.feed(text)
    more, last = parser.finish()
    content = (content + more).strip() if parser.num_calls else content + more
    return content or None, merge(deltas + last)
