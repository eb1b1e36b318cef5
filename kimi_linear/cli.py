"""``kimi-linear`` command line: ``info``, ``generate``, ``train``, ``plot``.

Bad input (missing files, malformed config, impossible arguments) prints one ``error:`` line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from kimi_linear.cache import cache_spec
from kimi_linear.config import PRESETS, KimiLinearConfig
from kimi_linear.errors import UserError
from kimi_linear.model import KimiLinearForCausalLM


def _config_from_args(args: argparse.Namespace) -> KimiLinearConfig:
    if args.model is not None:
        return KimiLinearConfig.from_pretrained(_model_dir(args.model))
    return KimiLinearConfig.from_preset(args.preset)


def _model_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} has no config.json: expected a model directory in the Hugging Face layout")
    return path


def device_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine, or None when it can. Asked before any work, because
    PyTorch reports a missing device late and deep (a pin_memory or ``_cuda_setDevice`` traceback)."""
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "the meta device holds no data; use cpu or a GPU"
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            return f"this PyTorch ({torch.__version__}) is built without CUDA; use --device cpu"
        found = f"its accelerator is {accelerator.type}" if accelerator else "it has no GPU or other accelerator"
        return f"{device.type} is not available on this machine ({found}); use --device cpu"
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s), numbered from 0"
    return None


def resolve_device(name: str | None) -> str:
    """``--device`` of ``generate``: the given device if this machine has it (else UserError), by default cuda
    when available, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1)") from e
    problem = device_problem(device)
    if problem:
        raise UserError(f"--device {name}: {problem}")
    return name


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """Interpret ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` in ``--prompt "import os\\n"``: shells pass them literally,
    and a prompt usually needs a newline. Any other backslash is kept; ``--prompt-file`` takes text verbatim."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text, flags=re.DOTALL)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: ``--prompt`` with escapes interpreted, or ``--prompt-file`` verbatim (``-``: standard input)."""
    if args.prompt is not None:
        return unescape(args.prompt)
    name = "standard input" if args.prompt_file == "-" else repr(args.prompt_file)
    try:
        if args.prompt_file == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin (embedding, tests) may be text only
            data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
        else:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
    except FileNotFoundError as e:
        raise UserError(f"--prompt-file {name} does not exist") from e
    except OSError as e:
        raise UserError(f"cannot read --prompt-file {name}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {name} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def cmd_info(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    spec = cache_spec(config, torch.bfloat16)
    per_token, per_sequence = spec.bytes_per_token, spec.bytes_per_slot
    types = config.layer_types
    print(f"layers:                 {len(types)} ({types.count('kda')} KDA, {types.count('mla')} MLA): "
          + "".join("M" if t == "mla" else "k" for t in types))
    print(f"total parameters:       {model.num_parameters():,}")
    print(f"activated parameters:   {model.num_activated_parameters():,} per token (excl. input embedding)")
    print(f"MLA cache (bf16):       {per_token:,} bytes per token")
    print(f"KDA state (fp32+bf16):  {per_sequence:,} bytes per sequence ({per_sequence / 2**20:.1f} MiB)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kimi_linear.generation import generate_stream
    from kimi_linear.tokenizer import load_tokenizer

    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    directory = _model_dir(args.model)
    device = resolve_device(args.device)
    prompt_text = read_prompt(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    model = KimiLinearForCausalLM.from_pretrained(directory, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(directory)
    if args.chat:
        if not hasattr(tokenizer, "encode_chat"):
            raise UserError("--chat needs the model's tiktoken.model tokenizer; this directory has none")
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt_text}])
    else:
        bos = tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + tokenizer.encode(prompt_text)
    if not ids:
        raise UserError("the prompt is empty")
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"the prompt encodes to token id {max(ids)}, outside the model's vocabulary of "
                        f"{model.config.vocab_size}: the tokenizer does not match this model")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([ids], device=device)
    eos = [*tokenizer.stop_token_ids, *model.config.eos_token_ids]  # <|im_end|> and [EOS] where it has them
    out: list[int] = []
    printed = ""
    if not args.chat:
        sys.stdout.write(prompt_text)
    for token in generate_stream(model, prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, generator=generator):
        out.append(int(token[0]))
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-linear", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and cache sizes of a preset or model directory")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--model", help="model directory (config.json)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt")
    gen.add_argument("--model", required=True, help="model directory in the Hugging Face layout")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text; \\n, \\t, \\r and \\\\ stand for a newline, a tab, a "
                                         "carriage return and a backslash")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE, verbatim (-: standard input)")
    gen.add_argument("--max-new-tokens", type=int, default=200,
                     help="stop after this many tokens (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="sampling temperature, 0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=50,
                     help="sample among the k most likely tokens, 0 = all (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.95,
                     help="sample among the most likely tokens that make up this probability (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the Kimi chat format, which needs tiktoken.model (default: off)")
    gen.add_argument("--device", help="cpu, cuda, cuda:N, ... (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="weights' dtype (default: bfloat16 on cuda, float32 otherwise)")
    gen.set_defaults(func=cmd_generate)

    from kimi_linear.train import cli as train_cli

    train = sub.add_parser("train", help="train a model (no arguments: the tiny preset on the built-in corpus)")
    train_cli.add_train_arguments(train)
    train.set_defaults(func=train_cli.run_train)
    plot = sub.add_parser("plot", help="plot the loss and throughput curves of a training run")
    train_cli.add_plot_arguments(plot)
    plot.set_defaults(func=train_cli.run_plot)
    from kimi_linear.server import cli as server_cli

    server_cli.register(sub)  # serve, chat
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        message = str(e).strip().splitlines()
        print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line.strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
