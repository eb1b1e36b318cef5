"""``kimi-linear chat``: a conversation in the terminal, on the engine directly (no HTTP).

Design choices:

- Every turn renders the whole conversation again (the chat format has no other state); the prefix cache makes
  that cheap: the previous turn's prompt and reply are a prefix of the new prompt, so only the new user message is
  computed. A dim status line after each reply shows the tokens generated, how many prompt tokens came from the
  cache, and the speed.
- The engine runs in :class:`AsyncEngine`'s background thread; each reply is streamed on one event loop kept for
  the whole session (the engine may still deliver an aborted request's last output after the reply ended, and a
  closed loop would make that raise in the engine thread), with a SIGINT handler installed only while a reply
  streams: Ctrl-C cancels the reply, which aborts its request (the engine frees its memory at the next step), and
  **keeps the partial reply** in the conversation, as chat interfaces keep a stopped answer (an empty one drops
  the turn). Ctrl-C at the prompt clears the line; Ctrl-D or ``/exit`` ends the session; ``/reset`` starts a new
  conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from kimi_linear.chat import ChatFormatError, render_chat
from kimi_linear.engine import RequestError, SamplingParams
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.errors import UserError
from kimi_linear.server.loading import load_engine
from kimi_linear.tokenizer import CHAT_MARKERS, Tokenizer

T = TypeVar("T")
HELP = "/reset: new conversation · /exit or Ctrl-D: quit · Ctrl-C: stop a reply"


class ChatSession:
    def __init__(self, runner: AsyncEngine, tokenizer: Tokenizer, *, system: str | None, temperature: float,
                 top_p: float, max_tokens: int, out: Any = sys.stdout) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.system = system
        self.params = dict(temperature=temperature, top_p=top_p)
        self.max_tokens = max_tokens
        self.out = out
        self.dim = out.isatty()
        self.messages: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.reset()

    def close(self) -> None:
        self.loop.close()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _status(self, text: str) -> None:
        self.out.write(f"\x1b[2m{text}\x1b[0m\n" if self.dim else f"{text}\n")
        self.out.flush()

    def turn(self, text: str) -> None:
        """One user message and the streamed reply. A Ctrl-C outside the streaming (while rendering, say) drops
        the turn."""
        before = len(self.messages)
        try:
            self._turn(text)
        except KeyboardInterrupt:
            del self.messages[before:]
            self.out.write("\n")
            self._status("[interrupted]")

    def _turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = render_chat(self.tokenizer, self.messages)
        except ChatFormatError as e:
            self.messages.pop()
            self._status(f"[{e}]")
            return
        room = self.runner.engine.max_model_len - len(prompt)
        if room < 1:
            self.messages.pop()
            self._status(f"[the conversation ({len(prompt)} tokens) is as long as the model allows: /reset]")
            return
        params = SamplingParams(max_tokens=min(self.max_tokens, room), stop_token_ids=self.tokenizer.stop_token_ids,
                                **self.params)
        try:
            reply, interrupted, status = self._run_reply(self._stream(prompt, params))
        except RequestError as e:
            self.messages.pop()
            self._status(f"[{e}]")
            return
        if interrupted:
            self.out.write("\n")
            self._status("[interrupted: the partial reply is kept]" if reply else "[interrupted]")
        if reply:
            self.messages.append({"role": "assistant", "content": reply})
        else:
            self.messages.pop()
        if status:
            self._status(status)

    def _run_reply(self, reply: Coroutine[Any, Any, T]) -> T:
        """Run a reply on the session's loop; SIGINT meanwhile cancels it (the coroutine decides what that means)."""
        task = self.loop.create_task(reply)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.loop.call_soon_threadsafe(task.cancel))
        try:
            return self.loop.run_until_complete(task)
        finally:
            signal.signal(signal.SIGINT, previous)

    async def _stream(self, prompt: list[int], params: SamplingParams) -> tuple[str, bool, str]:
        """(reply text, whether Ctrl-C cut it, status line)."""
        start = time.monotonic()
        pieces: list[str] = []
        last = None
        interrupted = False
        try:
            async for out in self.runner.generate(prompt, params):
                last = out
                for o in out.outputs:
                    if o.text:
                        pieces.append(o.text)
                        self.out.write(o.text)
                        self.out.flush()
        except asyncio.CancelledError:  # Ctrl-C: leaving the iteration aborted the request
            interrupted = True
        if not interrupted:
            self.out.write("\n")
        status = ""
        if last is not None:
            seconds = time.monotonic() - start
            n = last.num_output_tokens
            reason = next((o.finish_reason for o in last.outputs if o.finish_reason), None)
            status = (f"[{n} tokens, {last.num_cached_tokens} of {last.num_prompt_tokens} prompt tokens cached, "
                      f"{n / seconds:.1f} tokens/s{', ' + reason if reason and not interrupted else ''}]")
        return "".join(pieces), interrupted, status


def run_chat(args: argparse.Namespace) -> int:
    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    engine, tokenizer, directory = load_engine(args)
    has_format = tokenizer.chat_template is not None or all(m in tokenizer.special_tokens for m in CHAT_MARKERS)
    if not has_format:
        raise UserError(f"{directory} has no chat format (no chat markers in its tokenizer, no chat template): "
                        "use `kimi-linear generate` for plain completions")
    try:  # bad options are reported now, not at the first message
        SamplingParams(temperature=args.temperature, top_p=args.top_p).validate(engine.vocab_size)
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-')}") from None
    runner = AsyncEngine(engine).start()
    session = ChatSession(runner, tokenizer, system=args.system, temperature=args.temperature, top_p=args.top_p,
                          max_tokens=args.max_tokens)
    print(f"kimi-linear chat: {directory} ({engine.max_model_len:,} tokens of context). {HELP}", flush=True)
    try:
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
                print()
                continue
            except EOFError:
                print()
                break
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("[new conversation]", flush=True)
            elif command.startswith("/"):
                print(f"[unknown command {command.split()[0]!r}: {HELP}]", flush=True)
            else:
                session.turn(line)
    finally:
        runner.shutdown(timeout=5.0)
        session.close()
    return 0
