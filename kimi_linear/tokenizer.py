"""Tokenizers: the released model's tiktoken BPE, and a byte-level fallback for models trained here.

The Kimi tokenizer is a ``tiktoken.model`` file (one ``base64(token) rank`` line per token, 163,584 of
them) plus 256 reserved special tokens above the base vocabulary. Names of the specials come from
``tokenizer_config.json``'s ``added_tokens_decoder`` when present, else from the released assignment.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Protocol

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
NUM_RESERVED_SPECIAL = 256
KNOWN_SPECIALS = {  # offset above the base vocabulary → name
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 255: "[PAD]",
}


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; then BOS 256, EOS 257, PAD 258. Decoding skips specials and replaces
    invalid UTF-8 (a partial character) with U+FFFD."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """The released BPE through tiktoken. ``encode`` treats special-token text as ordinary text (safe for
    user input); :meth:`encode_chat` inserts the chat-format specials by id."""

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
            specials = {KNOWN_SPECIALS.get(i, f"<|reserved_token_{i}|>"): base + i for i in range(NUM_RESERVED_SPECIAL)}
        self.special_tokens = specials
        self.encoding = tiktoken.Encoding(name=os.path.basename(model_file), pat_str=KIMI_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = base + NUM_RESERVED_SPECIAL
        self.bos_token_id = specials.get("[BOS]")
        self.eos_token_id = specials.get("<|im_end|>", specials.get("[EOS]"))
        self.pad_token_id = specials.get("[PAD]")

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        specials = set(self.special_tokens.values())
        return self.encoding.decode([i for i in ids if i not in specials])

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Kimi chat format: ``<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>`` per message, then the
        assistant header when ``add_generation_prompt``."""
        s = self.special_tokens
        ids: list[int] = []
        for message in messages:
            role = message["role"]
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"chat role must be system, user or assistant, got {role!r}")
            ids += [s[f"<|im_{role}|>"], *self.encode(role), s["<|im_middle|>"], *self.encode(message["content"]),
                    s["<|im_end|>"]]
        if add_generation_prompt:
            ids += [s["<|im_assistant|>"], *self.encode("assistant"), s["<|im_middle|>"]]
        return ids


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The directory's ``tiktoken.model`` tokenizer (specials from ``tokenizer_config.json`` if present), or
    the byte-level tokenizer when it has none."""
    directory = os.fspath(directory)
    model_file = os.path.join(directory, "tiktoken.model")
    if not os.path.isfile(model_file):
        return ByteTokenizer()
    specials = None
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            decoder = json.load(f).get("added_tokens_decoder", {})
        specials = {entry["content"]: int(i) for i, entry in decoder.items()} or None
    return TiktokenTokenizer(model_file, specials)
