"""``kimi-linear serve`` and ``kimi-linear chat`` as commands: the default model directory, SIGTERM with requests in
flight, and the terminal chat driven through a pseudo-terminal."""

from __future__ import annotations

import http.client
import json
import select
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from serving_helpers import MARKERS, ROOT, Terminal, chain_model, random_model, save_model_dir, subprocess_env

from kimi_linear.cli import main
from kimi_linear.server.loading import resolve_model_dir, tokenizer_for
from kimi_linear.tokenizer import ByteTokenizer


def test_serve_without_model_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no --model given") and "kimi-linear train" in err[0]
    (tmp_path / "runs" / "tiny-stdlib").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-stdlib" / "config.json").write_text("{}")
    assert resolve_model_dir(None) == "runs/tiny-stdlib"


def test_older_byte_runs_get_chat_markers_when_they_fit(tmp_path):
    assert isinstance(tokenizer_for(str(tmp_path), 320), ByteTokenizer)
    assert tokenizer_for(str(tmp_path), 320).special_tokens["<|im_end|>"] == 259
    assert "<|im_end|>" not in tokenizer_for(str(tmp_path), 259).special_tokens  # no room: completions only


def _start_serve(model_dir, *extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "kimi_linear.cli", "serve", "--model", str(model_dir), "--port",
                             "0", "--log-level", "warning", "--memory-budget", "64MiB", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=subprocess_env())
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("kimi-linear: serving"):
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return proc, int(line.rsplit(":", 1)[1])
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"the server did not start: {''.join(lines)}")


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_zero(tmp_path):
    model_dir = save_model_dir(tmp_path / "model", random_model())
    proc, port = _start_serve(model_dir, "--shutdown-timeout", "5")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        results: dict[str, tuple] = {}
        started = {name: threading.Event() for name in ("short", "long")}

        def run(name: str, max_tokens: int) -> None:
            text, finish, usage = "", None, None
            stream = client.completions.create(model="model", prompt="def main():", max_tokens=max_tokens,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            for chunk in stream:
                started[name].set()
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            results[name] = (finish, usage.completion_tokens)

        threads = [threading.Thread(target=run, args=("short", 12)), threading.Thread(target=run, args=("long", 3000))]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values())
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=b'{"prompt": "x"}', headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 503  # draining: no new work
        assert json.loads(response.read())["error"]["code"] == "service_unavailable"
        for t in threads:
            t.join(90)
        assert results["short"] == ("length", 12)  # finished within the grace period
        assert results["long"][0] == "abort" and results["long"][1] < 3000  # aborted after it
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ALPHABET = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz "]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    # After the generation prompt the model writes the alphabet over and over: replies end at --max-tokens.
    chain = [MARKERS["<|im_middle|>"], *ALPHABET, ALPHABET[0]]
    return save_model_dir(tmp_path_factory.mktemp("chat"), chain_model(chain, default=ALPHABET[0]))


STATUS = r"\[(\d+) tokens, (\d+) of (\d+) prompt tokens cached"


def test_chat_in_a_terminal(chat_model_dir):
    term = Terminal([sys.executable, "-m", "kimi_linear.cli", "chat", "--model", str(chat_model_dir),
                     "--temperature", "0", "--max-tokens", "60", "--memory-budget", "64MiB"],
                    subprocess_env(), str(ROOT))
    term.expect(r"/reset", timeout=120)
    term.expect(r"> ")
    term.send("Hello\r")
    term.expect(r"abcdefghijklmnopqrstuvwxyz abcdefghijklmnopqrstuvwxyz abcdef\r?\n")
    first = term.expect(STATUS)
    assert int(first.group(1)) == 60 and int(first.group(3)) > 0
    term.expect(r"> ")
    term.send("And again\r")
    second = term.expect(STATUS)
    # The second turn's prompt starts with the first turn's prompt and reply: a prefix-cache hit.
    assert int(second.group(2)) > int(first.group(3))
    term.expect(r"> ")
    term.send("/reset\r")
    term.expect(r"\[new conversation\]")
    term.expect(r"> ")
    term.send("Hello\r")
    assert term.expect(STATUS).group(3) == first.group(3)  # the same first prompt as before the reset
    term.expect(r"> ")
    # Ctrl-C during a reply stops it; the session goes on.
    term.send("Go on\r")
    term.expect(r"abc")
    term.send("\x03")
    term.expect(r"\[interrupted")
    term.expect(r"> ")
    term.send("Once more\r")
    assert int(term.expect(STATUS).group(1)) == 60
    term.expect(r"> ")
    term.send("\x04")  # Ctrl-D
    assert term.wait() == 0
