"""Tokenizers: the released model's tiktoken BPE, and a byte-level tokenizer for models trained here.

Both speak the Kimi chat format, whose markers (``<|im_user|>``, ``<|tool_call_begin|>``, ...) are single special
tokens. Design choices:

- ``encode(text)`` never produces a special token: special-token strings inside text stay text. This is the
  function for anything a user wrote. ``encode_with_specials(text)`` turns special-token strings into their ids; it
  is only for markup we wrote ourselves (a chat template's own text), never for user text.
- The released tokenizer is a ``tiktoken.model`` file (one ``base64(token) rank`` line per token, 163,584 of them)
  plus 258 special slots above the base vocabulary (``num_reserved_special_tokens + 2`` in the released code), so
  its vocabulary is 163,842 ids, two more than the model's embedding. Names of the specials come from
  ``tokenizer_config.json``'s ``added_tokens_decoder`` when present (unnamed slots become
  ``<|reserved_token_{id}|>``, as in the released code), else from the released assignment below.
- The byte tokenizer keeps bytes 0..255, BOS 256, EOS 257, PAD 258 (training data and existing checkpoints depend on
  them) and, when the model directory declares them, puts the chat markers at 259 and up
  (:data:`BYTE_CHAT_SPECIALS`), inside the small presets' 320-id vocabulary. A directory says which tokenizer it
  was trained with through ``tokenizer_config.json`` (see :meth:`ByteTokenizer.save_pretrained`); a directory
  with neither ``tiktoken.model`` nor that file gets the plain byte tokenizer, without markers.
- Generation stops on ``<|im_end|>`` (end of a chat turn) and on ``[EOS]`` (end of a document): both are in
  ``stop_token_ids``. ``eos_token_id`` stays what each model was trained with.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol

# Pre-tokenisation of the released tokenizer: Han runs; cased word pieces with English contractions; digits
# in groups of at most 3; punctuation runs; newline and whitespace rules.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"

# The markers of the chat format, in the order of their ids in the released tokenizer.
CHAT_MARKERS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END,
                TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, IM_MIDDLE)

NUM_RESERVED_SPECIAL = 258
KNOWN_SPECIALS = {  # offset above the base vocabulary → name (architecture.md §5)
    0: BOS, 1: EOS, 2: IM_END, 3: IM_USER, 4: IM_ASSISTANT, 6: "<|start_header_id|>", 7: "<|end_header_id|>",
    9: "[EOT]", 10: IM_SYSTEM, 11: TOOL_CALLS_SECTION_BEGIN, 12: TOOL_CALLS_SECTION_END, 13: TOOL_CALL_BEGIN,
    14: TOOL_CALL_ARGUMENT_BEGIN, 15: TOOL_CALL_END, 17: IM_MIDDLE, 255: PAD,
}

BYTE_SPECIALS = {BOS: 256, EOS: 257, PAD: 258}
BYTE_CHAT_SPECIALS = {**BYTE_SPECIALS, **{name: 259 + i for i, name in enumerate(CHAT_MARKERS)}}
BYTE_TOKENIZER_CLASS = "ByteTokenizer"  # the ``tokenizer_class`` of a byte-level model directory


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    stop_token_ids: list[int]
    special_tokens: dict[str, int]
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_with_specials(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...


def _stop_ids(specials: Mapping[str, int], eos_token_id: int | None) -> list[int]:
    ids = [specials[name] for name in (IM_END, EOS) if name in specials]
    if eos_token_id is not None and eos_token_id not in ids:
        ids.append(eos_token_id)
    return ids


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; then BOS 256, EOS 257, PAD 258, and the chat markers when ``specials``
    names them (:data:`BYTE_CHAT_SPECIALS`). Decoding skips specials and replaces invalid UTF-8 (a partial
    character) with U+FFFD. The class attributes are the plain layout, which every byte-level model shares."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    chat_template: str | None = None

    def __init__(self, specials: Mapping[str, int] | None = None) -> None:
        specials = dict(BYTE_SPECIALS if specials is None else specials)
        for name, i in specials.items():
            if not isinstance(i, int) or i < 256:
                raise ValueError(f"byte tokenizer special {name!r} has id {i!r}: ids 0..255 are the bytes")
        if len(set(specials.values())) != len(specials):
            raise ValueError("byte tokenizer specials must have distinct ids")
        self.special_tokens = specials
        self.vocab_size = max([258, *specials.values()]) + 1
        self.bos_token_id = specials.get(BOS)
        self.eos_token_id = specials.get(EOS)
        self.pad_token_id = specials.get(PAD)
        self.stop_token_ids = _stop_ids(specials, self.eos_token_id)
        # Longest first, so a name that is a prefix of another never wins.
        names = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    @classmethod
    def with_chat_markers(cls) -> ByteTokenizer:
        """The byte tokenizer of models trained here to chat: markers at 259..268."""
        return cls(BYTE_CHAT_SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_specials(self, text: str) -> list[int]:
        if self._special_re is None:
            return self.encode(text)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self.encode(text[start:m.start()])
            ids.append(self.special_tokens[m.group(0)])
            start = m.end()
        return ids + self.encode(text[start:])

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation in the Kimi chat format (:func:`kimi_linear.chat.render_chat`)."""
        from kimi_linear.chat import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``tokenizer_config.json`` declaring this tokenizer (class and special-token ids) so that
        :func:`load_tokenizer` rebuilds it from the model directory. Returns the file's path."""
        path = os.path.join(os.fspath(directory), "tokenizer_config.json")
        config = {
            "tokenizer_class": BYTE_TOKENIZER_CLASS,
            "bos_token": BOS if BOS in self.special_tokens else None,
            "eos_token": EOS if EOS in self.special_tokens else None,
            "pad_token": PAD if PAD in self.special_tokens else None,
            "added_tokens_decoder": {str(i): {"content": name, "special": True}
                                     for name, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])},
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path


class TiktokenTokenizer:
    """The released BPE through tiktoken. ``encode`` treats special-token text as ordinary text (safe for
    user input); ``encode_with_specials`` and :meth:`encode_chat` insert specials by id."""

    chat_template: str | None = None

    def __init__(self, model_file: str, specials: dict[str, int] | None = None) -> None:
        import tiktoken

        ranks = {}
        with open(model_file, "rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{model_file}:{n} is not a 'base64-token rank' line") from e
        base = len(ranks)
        if specials is None:
            specials = {KNOWN_SPECIALS.get(i, f"<|reserved_token_{base + i}|>"): base + i
                        for i in range(NUM_RESERVED_SPECIAL)}
        else:
            specials = dict(specials)
            if any(i < base for i in specials.values()):
                raise ValueError(f"special token ids must be >= {base}, the size of the base vocabulary")
            # Unnamed slots get the released code's reserved names, so every slot id is a special.
            taken = set(specials.values())
            for i in range(base, base + NUM_RESERVED_SPECIAL):
                if i not in taken:
                    specials.setdefault(f"<|reserved_token_{i}|>", i)
        self.special_tokens = specials
        self._special_ids = frozenset(specials.values())
        self.encoding = tiktoken.Encoding(name=os.path.basename(model_file), pat_str=KIMI_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = max(base + NUM_RESERVED_SPECIAL, max(specials.values(), default=0) + 1)
        self.bos_token_id = specials.get(BOS)
        self.eos_token_id = specials.get(IM_END, specials.get(EOS))
        self.pad_token_id = specials.get(PAD)
        self.stop_token_ids = _stop_ids(specials, self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, disallowed_special=())

    def encode_with_specials(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes([i for i in ids if i not in self._special_ids])

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation in the Kimi chat format (:func:`kimi_linear.chat.render_chat`: the model directory's
        own template when it ships one, else the built-in format)."""
        from kimi_linear.chat import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt)


def _added_tokens(config: dict[str, Any], config_file: str) -> dict[str, int]:
    decoder = config.get("added_tokens_decoder", {})
    try:
        return {entry["content"]: int(i) for i, entry in decoder.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: added_tokens_decoder must map ids to {{\"content\": name}}") from e


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model directory was trained with, with its chat template attached (``chat_template``):

    - ``tiktoken.model``: the released BPE, specials named by ``tokenizer_config.json`` when present;
    - else ``tokenizer_config.json`` with ``"tokenizer_class": "ByteTokenizer"`` (or no class): the byte
      tokenizer with the specials of its ``added_tokens_decoder``;
    - else (neither file): the plain byte tokenizer.
    """
    from kimi_linear.chat import load_chat_template

    directory = os.fspath(directory)
    model_file = os.path.join(directory, "tiktoken.model")
    config_file = os.path.join(directory, "tokenizer_config.json")
    config = None
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object")
    tokenizer: Tokenizer
    if os.path.isfile(model_file):
        specials = _added_tokens(config, config_file) if config is not None else {}
        tokenizer = TiktokenTokenizer(model_file, specials or None)
    elif config is not None:
        cls = config.get("tokenizer_class")
        if cls not in (None, BYTE_TOKENIZER_CLASS):
            raise ValueError(f"{config_file} names tokenizer_class {cls!r}, which needs a tiktoken.model file that "
                             f"{directory} does not have")
        tokenizer = ByteTokenizer(_added_tokens(config, config_file) or None)
    else:
        tokenizer = ByteTokenizer()
    tokenizer.chat_template = load_chat_template(directory)
    return tokenizer
