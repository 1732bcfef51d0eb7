"""`efedge chat` driven through pipes: replies stream, /set, /regen, /clear, /stats,
multi-line input, /bye; Ctrl-C (SIGINT) stops a reply and keeps the conversation, a
second Ctrl-C exits with 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"\[ prompt: \d+ tokens, (?:[\d.]+|-) t/s \| generation: \d+ tokens, "
                     r"(?:[\d.]+|-) t/s \| experts: (?:[\d.]+% hit|n/a) \| "
                     r"stall: [\d.]+ ms/token \]")


@pytest.fixture(scope="module")
def model(tiny_gguf) -> Path:
    return tiny_gguf("qwen3moe", "F32")


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _chat(*args: str) -> list[str]:
    return [sys.executable, "-m", "efedge", "chat", *args]


def test_piped_session(model):
    script = "\n".join([
        "Hello there",
        "/set temp 0",
        "/set max_tokens 5",
        "What is up?",
        "/regen",
        '"""',
        "line one",
        "line two",
        '"""',
        "/set",
        "/set top_p 2",
        "/stats",
        "/clear",
        "/regen",
        "/nonsense",
        "/help",
        "/bye",
        "this line is never read",
    ]) + "\n"
    p = subprocess.run(_chat(str(model), "-sys", "Be brief.", "-n", "6", "-s", "3"),
                       input=script, capture_output=True, text=True, timeout=120,
                       env=_env(), encoding="utf-8")
    assert p.returncode == 0, p.stderr
    out, err = p.stdout, p.stderr
    segs = out.split(">>> ")
    assert segs[0] == ""
    assert "Set temperature to 0.0." in segs[2]
    assert "Set max_tokens to 5." in segs[3]
    # greedy: the regenerated reply is the same as the first one
    assert segs[4].strip() == segs[5].strip()
    assert segs[4].endswith("\n")
    # the triple-quoted message is one turn (its continuation prompts are "... ")
    assert segs[6].startswith("... ... ... ")
    assert "temperature=0.0" in segs[7] and "max_tokens=5" in segs[7]
    assert "system: Be brief." in segs[7]
    assert "top_p must be a number in (0, 1]" in segs[8]
    assert "tokens_generated" in segs[9]
    assert "7 messages" in segs[9]  # system + 3 user + 3 assistant
    assert "Cleared the conversation." in segs[10]
    assert "Nothing to regenerate yet." in segs[11]
    assert "Unknown command '/nonsense'" in segs[12]
    assert "/regen" in segs[13] and "/bye" in segs[13]
    assert "never read" not in out
    assert "efedge chat:" in err and "context" in err
    assert len(SUMMARY.findall(err)) == 4, err  # one line per reply


def test_context_overflow_drops_oldest_turns(model):
    short = ["one two three four", "five six seven eight", "nine ten eleven", "twelve"]
    script = "\n".join([*short, "word " * 200, "/stats", "still here", "/bye"]) + "\n"
    p = subprocess.run(_chat(str(model), "-c", "80", "-n", "8", "--temp", "0", "-sys", "Hi"),
                       input=script, capture_output=True, text=True, timeout=120,
                       env=_env(), encoding="utf-8")
    assert p.returncode == 0, p.stderr
    assert "outgrew the 80-token context: dropped the oldest" in p.stderr
    assert "this message is" in p.stderr and "the context holds 80" in p.stderr
    stats = p.stdout.split(">>> ")[6]
    n_msgs = int(re.search(r"(\d+) messages", stats).group(1))
    assert 3 <= n_msgs < 1 + 2 * len(short)  # the system prompt and the latest turns stay
    assert len(SUMMARY.findall(p.stderr)) == len(short) + 1


def test_chat_template_flag(tmp_path):
    from efedge.cli.common import chat_template_source

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert chat_template_source(str(f)) == f.read_text(encoding="utf-8")
    assert chat_template_source("chatml") == "chatml"
    assert chat_template_source(None) is None
    # an empty file was "unknown chat template ''", a folder "unknown chat template
    # 'DIR'": both said a name was wrong where a file was
    from efedge.errors import EfedgeError

    empty = tmp_path / "empty.jinja"
    empty.write_text("")
    with pytest.raises(EfedgeError, match=r"chat template file '.*empty.jinja' is empty"):
        chat_template_source(str(empty))
    with pytest.raises(EfedgeError, match=r"cannot read chat template file .*: Is a directory"):
        chat_template_source(str(tmp_path))


class _Reader:
    """Collects a pipe's text on a thread so the test can wait for a pattern."""

    def __init__(self, stream):
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 4096):
            with self._lock:
                self.text += chunk.decode("utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                i = self.text.find(pattern, start)
            if i >= 0:
                return i
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} did not appear; got {self.text[-500:]!r}")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_ctrl_c_stops_reply_then_second_exits(model):
    p = subprocess.Popen(_chat(str(model), "-c", "512", "--temp", "1.0", "--min-p", "0"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    out, err = _Reader(p.stdout), _Reader(p.stderr)
    try:
        p.stdin.write(b"Tell me a very long story\n")
        p.stdin.flush()
        i = out.wait_for(">>> ")
        deadline = time.monotonic() + 60
        while len(out.text) < i + 8 and time.monotonic() < deadline:  # the reply streams
            time.sleep(0.02)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        err.wait_for("[interrupted]", timeout=10)
        assert time.monotonic() - t0 < 10
        assert p.poll() is None, "one Ctrl-C must not exit"
        # the conversation goes on: the interrupted reply is kept
        p.stdin.write(b"/stats\n")
        p.stdin.flush()
        out.wait_for("2 messages", timeout=30)
        out.wait_for(">>> ", start=out.text.find("2 messages"))
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)  # at the prompt: a hint first …
        err.wait_for("Ctrl-C again", timeout=10)
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)  # … and the second one exits
        assert p.wait(timeout=15) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert len(SUMMARY.findall(err.text)) == 1


@pytest.mark.parametrize("n", ["-2", "-5"])
def test_n_predict_below_minus_one_is_refused(model, capsys, n):
    """`chat -n` takes what `/set max_tokens` and `run -n` take: -1 (until the end of the
    turn or a full context) or a count ≥ 0. Any negative number used to mean -1 silently."""
    from efedge.cli import main

    with pytest.raises(SystemExit) as info:
        main(["chat", str(model), "-n", n])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert re.search(rf"n-predict.*-1.*got {n}", err), err


@pytest.mark.parametrize("ioencoding", ["utf-8", None])
def test_input_that_is_not_utf8_is_refused_and_the_chat_goes_on(model, ioencoding):
    """A line with a byte that is not UTF-8 (a Latin-1 file piped in, a terminal in
    another encoding) was a traceback that ended the chat: a UnicodeDecodeError with
    PYTHONIOENCODING=utf-8, the tokenizer's "lone surrogate" ValueError with the locale's
    surrogateescape. The line is now refused with a note naming the byte."""
    env = _env()
    if ioencoding is None:
        del env["PYTHONIOENCODING"]
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    script = b'caf\xe9\n"""\nline \xff two\n"""\n/set max_tokens 3\nhello\n/stats\n/bye\n'
    p = subprocess.run(_chat(str(model), "--temp", "0"), input=script, capture_output=True,
                       timeout=120, env=env)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in err, err
    assert "not UTF-8 text (byte 0xff at offset 5)" in err, err  # in the second line
    assert "Set max_tokens to 3." in out
    assert len(SUMMARY.findall(err)) == 1, err  # only "hello" was answered
    assert "2 messages" in out  # the refused lines are not in the conversation


def test_a_system_prompt_that_is_not_utf8_is_a_one_line_error(model, capsys):
    from efedge.cli import main

    # what Python makes of the argument byte 0xe9 (surrogateescape)
    rc = main(["chat", str(model), "-sys", "caf\udce9"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "system prompt is not UTF-8 text (byte 0xe9 at offset 3)" in err, err


def test_end_of_input_inside_a_multiline_message_says_it_was_not_sent(model):
    """A piped script that ends before its closing \"\"\" lost the message without a
    word (the chat ended as at any end of input)."""
    p = subprocess.run(_chat(str(model), "--temp", "0", "-n", "2"),
                       input='"""\nhello\nthere\n', capture_output=True, text=True,
                       timeout=120, env=_env(), encoding="utf-8")
    assert p.returncode == 0, p.stderr
    assert 'end of input inside a """ message: it was not sent' in p.stderr, p.stderr
    assert not SUMMARY.search(p.stderr)
