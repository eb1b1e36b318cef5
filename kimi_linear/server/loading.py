"""Model directory → engine and tokenizer, for ``kimi-linear serve`` and ``kimi-linear chat`` (same options).

Design choices:

- Without ``--model``, the model of the built-in training run (``runs/tiny-stdlib``) is used when it exists; else a
  one-line error says how to make it.
- The tokenizer is the one the directory declares (:func:`load_tokenizer`). A byte-level directory that declares
  none (runs from before ``tokenizer_config.json`` was written) gets the byte tokenizer *with* chat markers when the
  model's vocabulary has room for them (the small presets have 320 ids), so it can still be chatted with; a model
  without that room serves completions only.
- Generation stops on the model config's EOS ids and the tokenizer's stop tokens (``<|im_end|>``, ``[EOS]``).
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from kimi_linear.engine import EngineConfig, LLMEngine, SchedulerConfig
from kimi_linear.errors import UserError
from kimi_linear.tokenizer import BYTE_CHAT_SPECIALS, ByteTokenizer, Tokenizer, load_tokenizer

DEFAULT_MODEL_DIR = os.path.join("runs", "tiny-stdlib")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"4MiB"``, ``"2GB"``, ``"1.5g"``, ``"65536"`` → bytes (argparse type)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4MiB, 2GB, 1048576)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser, *, max_num_seqs: int = 64) -> None:
    parser.add_argument("--model", help=f"model directory (default: {DEFAULT_MODEL_DIR}, the built-in training run)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-num-seqs", type=int, default=max_num_seqs, help="sequences running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step")
    parser.add_argument("--max-model-len", type=int, help="longest sequence (default: the model's, capped by memory)")
    parser.add_argument("--memory-budget", type=parse_size,
                        help="bytes for KDA state slots and MLA latent blocks, e.g. 8GiB (default: 90%% of free GPU "
                             "memory, 1 GiB on cpu)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="turn the prefix cache off")
    parser.add_argument("--seed", type=int, default=0, help="randomness of requests without a seed")


def resolve_model_dir(path: str | None) -> str:
    if path is None:
        if os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
            return DEFAULT_MODEL_DIR
        raise UserError(f"no --model given and {DEFAULT_MODEL_DIR} does not exist: make it with `kimi-linear train` "
                        "(the tiny preset on the built-in corpus) or pass --model DIR")
    if not os.path.isdir(path):
        raise UserError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} has no config.json: expected a model directory in the Hugging Face layout")
    return path


def tokenizer_for(directory: str, vocab_size: int) -> Tokenizer:
    """The directory's tokenizer; a byte-level directory that declares none gets the chat markers if they fit."""
    tokenizer = load_tokenizer(directory)
    declared = any(os.path.isfile(os.path.join(directory, f)) for f in ("tiktoken.model", "tokenizer_config.json"))
    if not declared and isinstance(tokenizer, ByteTokenizer) and vocab_size > max(BYTE_CHAT_SPECIALS.values()):
        template = tokenizer.chat_template
        tokenizer = ByteTokenizer.with_chat_markers()
        tokenizer.chat_template = template
    return tokenizer


def engine_options(args: argparse.Namespace) -> tuple[str, str, torch.dtype]:
    """(model directory, device, dtype) from the options of :func:`add_engine_arguments`, checked."""
    directory = resolve_model_dir(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return directory, device, dtype


def model_tokenizer(directory: str, model_config) -> tuple[Tokenizer, list[int]]:
    """The directory's tokenizer (checked against the model's vocabulary) and the ids that end a reply."""
    tokenizer = tokenizer_for(directory, model_config.vocab_size)
    if tokenizer.vocab_size > model_config.vocab_size + 2:  # the released tokenizer has two ids above the embedding
        raise UserError(f"the tokenizer of {directory} has {tokenizer.vocab_size} ids, more than the model's "
                        f"vocabulary of {model_config.vocab_size}")
    return tokenizer, list(dict.fromkeys([*model_config.eos_token_ids, *tokenizer.stop_token_ids]))


def engine_config(args: argparse.Namespace, memory_budget: int | None) -> EngineConfig:
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                enable_prefix_caching=args.prefix_caching)
    return EngineConfig(scheduler, max_model_len=args.max_model_len, memory_budget=memory_budget, seed=args.seed)


def load_engine(args: argparse.Namespace) -> tuple[LLMEngine, Tokenizer, str]:
    """(engine, tokenizer, model directory) from the options of :func:`add_engine_arguments`."""
    from kimi_linear.model import KimiLinearForCausalLM

    directory, device, dtype = engine_options(args)
    model = KimiLinearForCausalLM.from_pretrained(directory, dtype=dtype, device=device).eval()
    tokenizer, eos = model_tokenizer(directory, model.config)
    engine = LLMEngine(model, engine_config(args, args.memory_budget), decode=tokenizer.decode, eos_token_ids=eos)
    return engine, tokenizer, directory
