"""Tool calls in Kimi completions, parsed on token ids; and what ``tool_choice`` does to the prompt.

The model writes calls as single-token markers around text::

    content<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON}
    <|tool_call_end|>...<|tool_calls_section_end|>

Since each marker is one token id, the parser needs no text buffering for markers split across stream chunks (the
public text parsers' main difficulty); it only holds back the bytes of a UTF-8 character split across tokens.

Malformed output never raises. The rules, the same for whole completions and streams:

- A call is complete when ``<|tool_call_begin|> id <|tool_call_argument_begin|> arguments <|tool_call_end|>``
  appears inside a section and the id names a function (:func:`kimi_linear.chat.parse_tool_call_id`). Its
  OpenAI id is ``functions.NAME:IDX`` (IDX the model's, else the call's position); ``arguments`` is the text
  between the markers, verbatim (not validated as JSON: clients must check it, as with any OpenAI server).
- Section markers are structure and never appear in content; a section with no calls leaves nothing.
- Everything else becomes content, in order, with the call markers (begin / argument / end) of a call that is not
  complete written as their literal text, so that a broken call reads as its raw Kimi markup (a call never closed,
  a missing argument marker, an id without a name, markers out of order or outside a section, generation ending
  mid-call). Other special tokens (``<|im_end|>``, ...) are dropped, as ``decode`` does.
- Streaming with ``stream_arguments=True`` (the default) announces a call when its argument marker arrives and
  streams its arguments as they come; a call announced but never closed cannot be taken back, so it stays in the
  stream, incomplete, and only :attr:`ToolCallParser.tool_calls` (complete calls) and
  :attr:`ToolCallParser.has_tool_calls` tell ``finish_reason`` logic whether a call was made. With
  ``stream_arguments=False`` a call is emitted whole when it closes, and a stream's deltas add up exactly to
  :func:`parse_tool_calls`'s result.

``tool_choice`` (:func:`plan_tool_choice`): without constrained decoding, the prompt is what steers the model:
``none`` declares no tools and parses none; ``auto`` declares all; ``required`` declares all and prefills
``<|tool_calls_section_begin|>`` after the generation prompt; a named function declares only that tool and
prefills the whole call header up to ``<|tool_call_argument_begin|>``. The plan then checks the parsed calls.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kimi_linear.chat import ChatFormatError, normalize_tools, parse_tool_call_id, tool_call_id
from kimi_linear.tokenizer import (
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    Tokenizer,
)

_CONTENT, _SECTION, _CALL_ID, _ARGUMENTS, _BROKEN_CALL = range(5)


def _utf8_decoder() -> codecs.IncrementalDecoder:
    # Holds back the bytes of a character split across tokens; "replace" only for bytes that can never decode.
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class ToolCallParser:
    """Incremental parser of one completion's token ids into content and OpenAI tool calls.

    :meth:`feed` takes any number of ids and returns the new deltas in order, each an OpenAI chat-chunk ``delta``:
    ``{"content": text}`` or ``{"tool_calls": [...]}``, where a call's first entry carries ``index``, ``id``,
    ``type`` and ``function.name`` (and ``function.arguments``, "" or a first chunk), later entries ``index`` and a
    ``function.arguments`` chunk. :meth:`finish` flushes what the end of the completion decides.
    ``parse_tools=False`` (``tool_choice`` none) treats every marker as out of place. ``prefill`` are ids already
    placed after the generation prompt (:meth:`ToolChoicePlan.prefill_ids`); their deltas come first."""

    def __init__(self, tokenizer: Tokenizer, *, stream_arguments: bool = True, parse_tools: bool = True,
                 prefill: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stream_arguments = stream_arguments
        specials = tokenizer.special_tokens
        self._special_ids = frozenset(specials.values())
        self._names = {i: name for name, i in specials.items()}
        marker = (lambda name: specials.get(name)) if parse_tools else (lambda name: None)
        self._section_begin = marker(TOOL_CALLS_SECTION_BEGIN)
        self._section_end = marker(TOOL_CALLS_SECTION_END)
        self._call_begin = marker(TOOL_CALL_BEGIN)
        self._argument_begin = marker(TOOL_CALL_ARGUMENT_BEGIN)
        self._call_end = marker(TOOL_CALL_END)
        # Call markers out of place are written into content; section markers out of place are dropped.
        self._rendered = {specials[n] for n in (TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END)
                          if n in specials}
        self._state = _CONTENT
        self._content_decoder = _utf8_decoder()
        self._call_id = b""  # bytes of the id being read
        self._call: dict[str, Any] | None = None  # the call whose arguments are being read
        self._arguments = b""  # its argument bytes not yet emitted (all of them when not streaming)
        self._arguments_decoder = _utf8_decoder()
        self._announced = 0  # calls given an index so far
        self._out: list[dict[str, Any]] = []
        self.content = ""
        self.tool_calls: list[dict[str, Any]] = []  # complete calls, OpenAI message format
        self._finished = False
        self._pending: list[dict[str, Any]] = []
        self._pending = self.feed(prefill)

    @property
    def has_tool_calls(self) -> bool:
        """Whether at least one complete tool call was produced (``finish_reason`` "tool_calls")."""
        return bool(self.tool_calls)

    # ------------------------------------------------------------------------------------------------------------
    def feed(self, token_ids: Iterable[int]) -> list[dict[str, Any]]:
        """Deltas for the next token ids of the completion."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        ids = list(token_ids)
        i = 0
        while i < len(ids):
            j = i
            while j < len(ids) and ids[j] not in self._special_ids:
                j += 1
            if j > i:
                self._text(self._tokenizer.decode_bytes(ids[i:j]))
            if j < len(ids):
                self._marker(ids[j])
            i = j + 1
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        """Deltas the end of the completion decides: an unfinished call id, or (not streaming) unfinished
        arguments, become content; a split UTF-8 character left at the end becomes U+FFFD."""
        if not self._finished:
            if self._state == _CALL_ID:
                self._abandon_id()
            elif self._state == _ARGUMENTS:
                self._abandon_arguments()
            self._emit_content(self._content_decoder.decode(b"", final=True))
            self._finished = True
        return self._take()

    # ------------------------------------------------------------------------------------------------------------
    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._pending + self._out, []
        self._pending = []
        return out

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        self.content += text
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append({"content": text})

    def _content_bytes(self, data: bytes) -> None:
        self._emit_content(self._content_decoder.decode(data))

    def _render(self, token_id: int) -> bytes:
        return self._names[token_id].encode()

    def _emit_call_delta(self, entry: dict[str, Any]) -> None:
        last = self._out[-1]["tool_calls"] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last[-1]["index"] == entry["index"] and "id" not in entry:
            last[-1]["function"]["arguments"] += entry["function"]["arguments"]
        elif last is not None:
            last.append(entry)
        else:
            self._out.append({"tool_calls": [entry]})

    def _announce(self, call: dict[str, Any]) -> None:
        self._emit_call_delta({"index": call["index"], "id": call["id"], "type": "function",
                               "function": {"name": call["function"]["name"], "arguments": ""}})

    def _emit_arguments(self, final: bool) -> None:
        text = self._arguments_decoder.decode(self._arguments, final=final)
        self._arguments = b""
        self._call["function"]["arguments"] += text
        if text:
            self._emit_call_delta({"index": self._call["index"], "function": {"arguments": text}})

    # ------------------------------------------------------------------------------------------------------------
    def _text(self, data: bytes) -> None:
        if self._state == _CALL_ID:
            self._call_id += data
        elif self._state == _ARGUMENTS:
            self._arguments += data
            if self._stream_arguments:
                self._emit_arguments(final=False)
        else:  # content, text between calls of a section, a broken call's arguments
            self._content_bytes(data)

    def _marker(self, t: int) -> None:
        state = self._state
        if state == _CALL_ID:
            if t == self._argument_begin:
                return self._start_arguments()
            if t == self._call_end:  # no argument marker
                self._abandon_id(closing=t)
                self._state = _SECTION
                return None
            if t in (self._call_begin, self._section_begin, self._section_end):
                self._abandon_id()
                self._state = _SECTION
                return self._marker(t)
        elif state == _ARGUMENTS:
            if t == self._call_end:
                return self._close_call()
            if t in (self._call_begin, self._argument_begin, self._section_begin, self._section_end):
                self._abandon_arguments()
                self._state = _SECTION
                return self._marker(t)
        elif state == _BROKEN_CALL:
            if t == self._call_end:
                self._content_bytes(self._render(t))
                self._state = _SECTION
                return None
            if t in (self._call_begin, self._argument_begin, self._section_begin, self._section_end):
                self._state = _SECTION
                return self._marker(t)
        elif state == _SECTION:
            if t == self._call_begin:
                self._state, self._call_id = _CALL_ID, b""
                return None
            if t == self._section_end:
                self._state = _CONTENT
                return None
            if t == self._section_begin:
                return None
        elif t == self._section_begin:  # _CONTENT
            self._state = _SECTION
            return None
        if t in self._rendered:  # a call marker out of place
            self._content_bytes(self._render(t))
        return None  # other special tokens, stray section markers: dropped

    def _start_arguments(self) -> None:
        parsed = parse_tool_call_id(self._call_id.decode("utf-8", errors="replace"))
        if parsed is None:  # an id without a name: the whole call becomes content
            self._abandon_id(closing=self._argument_begin)
            self._state = _BROKEN_CALL
            return
        name, index = parsed
        self._call = {"index": None, "id": tool_call_id(name, self._announced if index is None else index),
                      "type": "function", "function": {"name": name, "arguments": ""}}
        self._arguments, self._arguments_decoder = b"", _utf8_decoder()
        self._state = _ARGUMENTS
        if self._stream_arguments:
            self._call["index"] = self._announced
            self._announced += 1
            self._announce(self._call)

    def _close_call(self) -> None:
        call = self._call
        if self._stream_arguments:
            self._emit_arguments(final=True)
        else:
            call["index"] = self._announced
            self._announced += 1
            self._announce(call)
            self._emit_arguments(final=True)
        self.tool_calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
        self._call, self._state = None, _SECTION

    def _abandon_id(self, closing: int | None = None) -> None:
        """The call being opened is not a call: its begin marker, id text (and ``closing`` marker) → content."""
        self._content_bytes(self._render(self._call_begin) + self._call_id
                            + (self._render(closing) if closing is not None else b""))
        self._call_id = b""

    def _abandon_arguments(self) -> None:
        """The call is never closed. Streaming: it was already announced and stays as it is. Otherwise its
        markup becomes content."""
        if self._stream_arguments:
            self._emit_arguments(final=True)
        else:
            self._content_bytes(self._render(self._call_begin) + self._call_id + self._render(self._argument_begin)
                                + self._arguments)
        self._call, self._arguments, self._call_id = None, b"", b""


def parse_tool_calls(token_ids: Sequence[int], tokenizer: Tokenizer, *, parse_tools: bool = True,
                     prefill: Sequence[int] = ()) -> tuple[str, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a whole completion: OpenAI ``tool_calls`` entries ``{"id":
    "functions.NAME:IDX", "type": "function", "function": {"name": NAME, "arguments": JSON text}}``. Stop tokens
    may be included (they are dropped). Never raises on malformed output (rules in the module docstring)."""
    parser = ToolCallParser(tokenizer, stream_arguments=False, parse_tools=parse_tools, prefill=prefill)
    parser.feed(token_ids)
    parser.finish()
    return parser.content, parser.tool_calls


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolChoicePlan:
    """What a request's ``tool_choice`` does: ``mode`` is "none", "auto", "required" or "function";
    ``tools`` the tools to declare in the prompt (None: none); ``function`` the named function."""

    mode: str
    tools: list[dict[str, Any]] | None
    function: str | None = None

    @property
    def parse_tools(self) -> bool:
        """Whether the completion's tool calls are parsed (else every marker is content)."""
        return self.mode != "none"

    def prefill_ids(self, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]] = ()) -> list[int]:
        """Ids to place after the generation prompt, opening the tool-call section (``required``) or the named
        function's call (its index counts the tool calls of ``messages``, like the rendered history's ids)."""
        s = tokenizer.special_tokens
        if self.mode == "required":
            return [s[TOOL_CALLS_SECTION_BEGIN]]
        if self.mode == "function":
            index = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
            return [s[TOOL_CALLS_SECTION_BEGIN], s[TOOL_CALL_BEGIN],
                    *tokenizer.encode(tool_call_id(self.function, index)), s[TOOL_CALL_ARGUMENT_BEGIN]]
        return []

    def violations(self, tool_calls: Sequence[dict[str, Any]]) -> list[str]:
        """Ways the parsed calls break the request's ``tool_choice`` (empty when they comply)."""
        declared = {t["function"]["name"] for t in self.tools or ()}
        problems = [f"the model called {c['function']['name']!r}, which the request does not offer"
                    for c in tool_calls if c["function"]["name"] not in declared]
        if self.mode in ("required", "function") and not tool_calls:
            problems.append(f"tool_choice {self.function or self.mode!r} needs a tool call and the model made none")
        return problems


def plan_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoicePlan:
    """The :class:`ToolChoicePlan` of an OpenAI ``tool_choice`` ("none", "auto", "required",
    ``{"type": "function", "function": {"name": ...}}``, or None: "auto" with tools, else "none"). Raises
    :class:`ChatFormatError` for an invalid choice, a named function the tools do not offer, or a choice that
    needs tools when there are none."""
    tools = normalize_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolChoicePlan("none", None)
    if tool_choice in ("auto", "required"):
        if not tools and tool_choice == "required":
            raise ChatFormatError("tool_choice 'required' needs tools")
        return ToolChoicePlan(tool_choice, tools)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ChatFormatError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        chosen = [t for t in tools or () if t["function"]["name"] == name]
        if not chosen:
            raise ChatFormatError(f"tool_choice names function {name!r}, which is not in tools")
        return ToolChoicePlan("function", chosen[:1], name)
    raise ChatFormatError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}")
