"""Chat prompts in the Kimi format: request validation, the built-in renderer, and checkpoint Jinja templates.

The format (serving.md §6, checked against Moonshot's released Kimi K2 chat templates, which share this tokenizer)::

    <|im_system|>tool_declare<|im_middle|>{tools as JSON}<|im_end|>             (only when tools are given)
    <|im_system|>system<|im_middle|>{content}<|im_end|>
    <|im_user|>{name or "user"}<|im_middle|>{content}<|im_end|>
    <|im_assistant|>{name or "assistant"}<|im_middle|>{content}<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{arguments}<|tool_call_end|> ...
        <|tool_calls_section_end|><|im_end|>                                    (section only with tool_calls)
    <|im_system|>{name or "tool"}<|im_middle|>## Return of {tool_call_id}\\n{content}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>                                      (the generation prompt)

No whitespace between turns or markers. Design choices:

- Markers are inserted by id. Every piece of text (role name, content, tool-call id, arguments, tools JSON, the
  ``## Return of`` header) is encoded on its own with the tokenizer's plain ``encode``, so text from users never
  becomes a control token and BPE never merges across a marker or a content boundary.
- Tools are declared with their keys deep-sorted (the released tokenizer's ``apply_chat_template`` sorts them) and
  serialised compactly (``separators=(",", ":")``, ``ensure_ascii=False``), as the Kimi K2-Thinking template does.
  Arguments given as a JSON string are kept verbatim; given as an object they are serialised like Jinja's
  ``tojson`` (default separators), as the released templates do.
- History tool-call ids not of the form ``functions.NAME:IDX`` (e.g. OpenAI's ``call_abc``) are renamed
  ``functions.NAME:N``, N counting tool calls from the start of the conversation (the released K2 template's
  counter), and tool results' ``tool_call_id`` are mapped the same way; an id the history never issued is kept.
- The role ``developer`` (newer OpenAI clients) is rendered as ``system``. Content is a string, null (assistant
  only: nothing), or a list of text parts, joined without separator. An empty string renders as nothing.
- A checkpoint's own template (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``) is
  rendered with jinja2 in a sandbox, with the options and helpers of Hugging Face's ``apply_chat_template`` (whose
  sandbox is immutable; ours lets a template mutate the copies it is given, as some Kimi templates do). Only the
  template's own text may become special tokens: message contents are replaced by unique sentinels before rendering, and
  every special-token string inside any other string we pass (names, ids, arguments, tools) by a sentinel too; the
  rendered string is split at the sentinels, template text is encoded with specials allowed and each sentinel's
  original text with plain ``encode``. Limitation: a template that inspects or transforms content (``trim``,
  ``split``) sees the sentinel, not the text; empty contents are passed as "" (no sentinel) so truthiness tests work.
- Errors: :class:`ChatFormatError` (a ``ValueError``) for requests the format cannot express (HTTP 400), with a
  message naming the offending field; :class:`ChatTemplateError` for a model directory that cannot render chats
  (a broken template, a tokenizer without chat markers): a server-side problem.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kimi_linear.errors import UserError
from kimi_linear.tokenizer import (
    IM_ASSISTANT,
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    IM_USER,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    Tokenizer,
)

KIMI_DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"developer": "system"}
_TURN_START = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT, "tool": IM_SYSTEM}
_CANONICAL_ID = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)


class ChatFormatError(ValueError):
    """The request cannot be rendered in the chat format (an HTTP 400); the message names the field."""


class ChatTemplateError(UserError):
    """The model directory cannot render chats: its template is broken or its tokenizer lacks the markers."""


def tool_call_id(name: str, index: int) -> str:
    """The Kimi id of the ``index``-th tool call, to function ``name``."""
    return f"functions.{name}:{index}"


def parse_tool_call_id(text: str) -> tuple[str, int | None] | None:
    """``(name, index)`` of a model-written tool-call id, or None when it names no function. The name is what
    lies between ``functions.`` and the last ``:``; both are optional (models sometimes drop them), the index is
    None when absent. A name is non-empty and has no whitespace."""
    text = text.strip()
    body = text[len("functions."):] if text.startswith("functions.") else text
    name, colon, index = body.rpartition(":")
    if not (colon and index.isascii() and index.isdigit()):
        name, index = body, ""
    if not name or any(c.isspace() for c in name):
        return None
    return name, int(index) if index else None


# ----------------------------------------------------------------------------------------------------------------
# Validation and normalisation of an OpenAI-style request
@dataclass
class _ToolCall:
    id: str
    name: str
    arguments: Any  # str (kept verbatim) or a JSON value

    def arguments_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class _Message:
    role: str
    role_name: str  # what follows the turn's start marker
    content: str | None
    tool_calls: list[_ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other fields, passed on to checkpoint templates


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"{where}.content must be a string, a list of text parts or null")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ChatFormatError(f"{where}.content[{j}] must be an object like {{\"type\": \"text\", \"text\": ...}}")
        if part.get("type") != "text":
            raise ChatFormatError(f"{where}.content[{j}] has type {part.get('type')!r}: this model accepts only "
                                  "text content parts")
        if not isinstance(part.get("text"), str):
            raise ChatFormatError(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(value: Any, where: str) -> list[tuple[Any, str, Any]]:
    """``(id, name, arguments)`` of each entry of an assistant message's ``tool_calls``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ChatFormatError(f"{where}.tool_calls must be a list")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise ChatFormatError(f"{at} must be an object")
        if call.get("type", "function") != "function":
            raise ChatFormatError(f"{at}.type must be 'function', got {call.get('type')!r}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise ChatFormatError(f"{at}.function must be an object with a name and arguments")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"{at}.function.name must be a non-empty string")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = "{}"
        elif not isinstance(arguments, (str, dict)):
            raise ChatFormatError(f"{at}.function.arguments must be a JSON string or an object")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ChatFormatError(f"{at}.id must be a string")
        calls.append((call.get("id"), name, arguments))
    return calls


def _normalize_messages(messages: Any) -> list[_Message]:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    out: list[_Message] = []
    renamed: dict[str, str] = {}  # history tool-call id → its Kimi form
    n_calls = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatFormatError(f"{where} must be an object")
        role = message.get("role")
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if role not in ROLES:
            raise ChatFormatError(f"{where}: chat role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise ChatFormatError(f"{where}.name must be a string")
        content = _text_content(message.get("content"), where)
        if content is None and role != "assistant":
            raise ChatFormatError(f"{where}.content is required for a {role} message")
        extra = {k: v for k, v in message.items() if k not in ("role", "content", "tool_calls", "tool_call_id")}
        m = _Message(role, name or role, content, extra=extra)
        if role == "assistant":
            for call_id, fname, arguments in _tool_calls(message.get("tool_calls"), where):
                canonical = _CANONICAL_ID.fullmatch(call_id or "")
                if canonical is None or canonical.group(1) != fname:
                    new_id = tool_call_id(fname, n_calls)
                    if call_id is not None:
                        renamed[call_id] = new_id
                    call_id = new_id
                m.tool_calls.append(_ToolCall(call_id, fname, arguments))
                n_calls += 1
        elif message.get("tool_calls"):
            raise ChatFormatError(f"{where}: only assistant messages carry tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatFormatError(f"{where}: a tool message needs a tool_call_id string")
            m.tool_call_id = renamed.get(call_id, call_id)
        out.append(m)
    return out


def _deep_sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_deep_sorted(v) for v in value]
    return value


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Validated OpenAI ``tools`` with their keys deep-sorted (None for no tools); :class:`ChatFormatError` when
    malformed."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ChatFormatError("tools must be a list")
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ChatFormatError(f"tools[{j}] must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatFormatError(f"tools[{j}].function must be an object with a non-empty name")
    return _deep_sorted(tools) or None


def tools_json(tools: list[dict[str, Any]]) -> str:
    """The body of the ``tool_declare`` turn."""
    return json.dumps(_deep_sorted(tools), ensure_ascii=False, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------------------------
# Built-in renderer
def _marker_ids(tokenizer: Tokenizer) -> dict[str, int]:
    names = (IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END, TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END,
             TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END)
    missing = [n for n in names if n not in tokenizer.special_tokens]
    if missing:
        raise ChatTemplateError(f"the tokenizer has no {', '.join(missing)} token: this model directory does not "
                                "declare the chat markers (tokenizer_config.json)")
    return {n: tokenizer.special_tokens[n] for n in names}


def _render_builtin(tokenizer: Tokenizer, messages: list[_Message], tools: list[dict[str, Any]] | None,
                    add_generation_prompt: bool, default_system: str | None) -> list[int]:
    mk = _marker_ids(tokenizer)
    encode = tokenizer.encode
    ids: list[int] = []

    def turn(start: str, role_name: str, *body: list[int]) -> None:
        ids.extend([mk[start], *encode(role_name), mk[IM_MIDDLE]])
        for piece in body:
            ids.extend(piece)
        ids.append(mk[IM_END])

    if tools:
        turn(IM_SYSTEM, "tool_declare", encode(tools_json(tools)))
    if default_system is not None and messages[0].role != "system":
        turn(IM_SYSTEM, "system", encode(default_system))
    for m in messages:
        body = [encode(m.content or "")]
        if m.role == "tool":
            body.insert(0, encode(f"## Return of {m.tool_call_id}\n"))
        if m.tool_calls:
            section = [mk[TOOL_CALLS_SECTION_BEGIN]]
            for call in m.tool_calls:
                section += [mk[TOOL_CALL_BEGIN], *encode(call.id), mk[TOOL_CALL_ARGUMENT_BEGIN],
                            *encode(call.arguments_text()), mk[TOOL_CALL_END]]
            body.append(section + [mk[TOOL_CALLS_SECTION_END]])
        turn(_TURN_START[m.role], m.role_name, *body)
    if add_generation_prompt:
        ids += [mk[IM_ASSISTANT], *encode("assistant"), mk[IM_MIDDLE]]
    return ids


def render_kimi(tokenizer: Tokenizer, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, default_system: str | None = None) -> list[int]:
    """The conversation in the built-in Kimi format. ``default_system`` (e.g. :data:`KIMI_DEFAULT_SYSTEM_PROMPT`,
    which the released templates inject) is added as a system turn when the conversation does not start with
    one; by default nothing is added."""
    return _render_builtin(tokenizer, _normalize_messages(messages), normalize_tools(tools), add_generation_prompt,
                           default_system)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint templates
class _TemplateRaised(Exception):
    """``raise_exception(...)`` called by a template: it rejects the conversation."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes < > & ' for HTML, which would corrupt markers and JSON; chat templates expect
    # plain json.dumps with its keyword options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import SandboxedEnvironment

    class Namespace(jinja2.utils.Namespace):
        # The sandbox refuses reads of underscore attributes; refuse writing them as well.
        def __setitem__(self, name: str, value: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a template may not set namespace attribute {name!r}")
            super().__setitem__(name, value)

    # Not the immutable sandbox: some published Kimi templates append to lists they build, and every object a
    # template sees is a fresh copy made for this render, so letting it mutate them is harmless.
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e} (line {e.lineno})") from e


@functools.lru_cache(maxsize=8)
def _special_pattern(names: tuple[str, ...]) -> re.Pattern[str] | None:
    ordered = sorted(names, key=len, reverse=True)  # a name that is a prefix of another never wins
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _token_name(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return next((n for n, i in tokenizer.special_tokens.items() if i == token_id), None)


def render_template(tokenizer: Tokenizer, template: str, messages: list[dict[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered by a checkpoint's Jinja ``template``; only the template's own text may become
    special tokens (see the module docstring). The template gets ``messages`` (validated, tool-call ids
    normalised, content a string or null), ``tools``, ``add_generation_prompt``, the ``bos_token`` /
    ``eos_token`` / ``pad_token`` strings, and the helpers ``tojson``, ``raise_exception``, ``strftime_now``,
    ``namespace``."""
    import jinja2

    compiled = _compile(template)
    normalized, tools = _normalize_messages(messages), normalize_tools(tools)
    nonce = secrets.token_hex(8)
    plain: list[str] = []  # texts to encode without specials, in sentinel order
    specials = _special_pattern(tuple(tokenizer.special_tokens))

    def protect(text: str) -> str:
        plain.append(text)
        return f"\ue000{nonce}:{len(plain) - 1}\ue001"

    def escape(value: Any) -> Any:
        if isinstance(value, str):
            return specials.sub(lambda m: protect(m.group(0)), value) if specials else value
        if isinstance(value, dict):
            return {escape(k): escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(v) for v in value]
        return value

    context_messages = []
    for m in normalized:
        d = {k: escape(v) for k, v in m.extra.items()}
        d["role"] = m.role
        d["content"] = protect(m.content) if m.content else m.content
        if m.tool_calls:
            d["tool_calls"] = [{"id": escape(c.id), "type": "function",
                                "function": {"name": escape(c.name), "arguments": escape(c.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = escape(m.tool_call_id)
        context_messages.append(d)
    try:
        text = compiled.render(
            messages=context_messages, tools=escape(tools), add_generation_prompt=add_generation_prompt,
            bos_token=_token_name(tokenizer, tokenizer.bos_token_id) or "",
            eos_token=_token_name(tokenizer, tokenizer.eos_token_id) or "",
            pad_token=_token_name(tokenizer, tokenizer.pad_token_id) or "")
    except _TemplateRaised as e:
        raise ChatFormatError(f"the model's chat template rejected the conversation: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the model's chat template did something the sandbox forbids: {e}") from e
    except Exception as e:  # the template tripped over this conversation's shape (undefined field, None + str, ...)
        raise ChatFormatError(f"the model's chat template cannot render this conversation: {type(e).__name__}: {e}") \
            from e
    ids: list[int] = []
    for k, piece in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
        ids += tokenizer.encode(plain[int(piece)]) if k % 2 else tokenizer.encode_with_specials(piece)
    return ids


def load_chat_template(directory: str | os.PathLike) -> str | None:
    """A model directory's own chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates of which ``default`` is used); None if neither."""
    directory = os.fspath(directory)
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # Hugging Face's named templates
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, template: str | None = None,
                default_system: str | None = None) -> list[int]:
    """Token ids of a conversation (OpenAI ``messages`` and ``tools``), ending with the assistant's generation
    prompt when ``add_generation_prompt``. ``template`` is a Jinja chat template; None means the tokenizer's
    ``chat_template`` (the model directory's, see :func:`load_chat_template`) and, failing that, the built-in
    Kimi format (:func:`render_kimi`, which alone uses ``default_system``). Raises :class:`ChatFormatError` for an
    invalid conversation."""
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        return render_template(tokenizer, template, messages, tools=tools,
                               add_generation_prompt=add_generation_prompt)
    return render_kimi(tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                       default_system=default_system)
