"""Test helpers for the server: tiny model directories, models that follow a token chain, a live server in a thread,
and a pseudo-terminal driver."""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
from pathlib import Path

import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, SchedulerConfig
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.tokenizer import BYTE_CHAT_SPECIALS, ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
MARKERS = BYTE_CHAT_SPECIALS  # name → id in the byte tokenizer with chat markers


def random_model(seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()


def chain_model(chain: list[int], default: int) -> KimiLinearForCausalLM:
    """A model whose greedy next token depends on the current token only: ``chain[i]`` → ``chain[i + 1]``, any
    other token → ``default``. Every block's output projections are zero, so the residual stream is the token's
    embedding: a one-hot direction per chain token that the output head maps to its successor."""
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError("a chain of next-token rules needs distinct tokens (but the last)")
    model = random_model()
    hidden = model.config.hidden_size
    if len(chain) > hidden:
        raise ValueError(f"at most {hidden} chain tokens")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, hidden - 1] = 1.0  # every token not in the chain: the last direction
        head.zero_()
        head[default, hidden - 1] = 10.0
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            embed[a].zero_()
            embed[a, i] = 1.0
            head[b, i] = 10.0
    return model


def save_model_dir(path: Path, model: KimiLinearForCausalLM, *, chat_markers: bool = True) -> Path:
    model.save_pretrained(path)
    if chat_markers:
        ByteTokenizer.with_chat_markers().save_pretrained(path)
    return path


def text_ids(text: str) -> list[int]:
    return list(text.encode())


class LiveServer:
    """``build_app`` served by uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, model: KimiLinearForCausalLM, tokenizer=None, *, name: str = "test-model",
                 api_key: str | None = None, max_body_bytes: int = 1 << 20, max_num_seqs: int = 64,
                 caching: bool = True, num_slots: int = 200, num_blocks: int = 400) -> None:
        import uvicorn

        from kimi_linear.server.app import build_app

        self.tokenizer = tokenizer or ByteTokenizer.with_chat_markers()
        self.engine = LLMEngine(
            model, EngineConfig(SchedulerConfig(max_num_seqs=max_num_seqs, enable_prefix_caching=caching),
                                num_slots=num_slots, num_blocks=num_blocks, block_size=16, max_model_len=2048),
            decode=self.tokenizer.decode, eos_token_ids=self.tokenizer.stop_token_ids)
        self.runner = AsyncEngine(self.engine)
        self.app = build_app(self.runner, self.tokenizer, name, api_key=api_key, max_body_bytes=max_body_bytes,
                             shutdown_timeout=10.0)
        self.ctx = self.app.state.ctx
        self.api_key = api_key
        self.name = name
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self.wait_until(lambda: self.server.started)
        self.wait_until(lambda: self.ctx.state == "ready")  # after the warm-up request
        return self

    def wait_until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self._thread.is_alive() and time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "the server did not stop"
        self._socket.close()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=120,
                             **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0,
                                  timeout=120, **kwargs)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the engine has no request left (aborts are processed at its next step)."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() or self.engine.num_running or self.engine.num_waiting:
            assert time.monotonic() < deadline, f"engine still busy: {self.engine.request_ids}"
            time.sleep(0.02)


def metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name with labels: value} (labels as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The value of ``name`` whose labels include ``labels`` (summed over the others)."""
    total, found = 0.0, False
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total, found = total + value, True
    assert found, f"no sample {name} {labels}"
    return total


class Terminal:
    """A child process on a pseudo-terminal (its controlling terminal: Ctrl-C there is SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        self.buffer = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Read until ``pattern`` matches the output since the last match; consume through the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buffer)
            if m:
                self.buffer = self.buffer[m.end():]
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; output so far: {self.buffer[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the process ended before {pattern!r}; output: {self.buffer[-2000:]!r}")
                self.buffer += data.decode("utf-8", errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += os.read(self.fd, 4096).decode("utf-8", errors="replace")
            except OSError:
                time.sleep(0.1)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the process did not exit; output: {self.buffer[-2000:]!r}")


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m kimi_linear.cli`` child: this checkout's package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
