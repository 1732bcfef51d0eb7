"""Hostile and careless input through the public API: every mistake is an error that
names what is wrong (the parameter, the number, the key, the tensor, the template), never
a crash, a numpy exception or silent nonsense. (The server's input: test_server.py.)"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import efedge

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(n_layer=2, n_expert=4, n_expert_used=2)
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "F16", **TINY)


@pytest.fixture(scope="module")
def m(path):
    with efedge.load(path, n_ctx=32) as model:
        yield model


# -- context ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [32, 40, 1000])
def test_prompt_longer_than_the_context_names_both_numbers(m, n):
    ids = list(range(1, n + 1))
    for call in (lambda: m.generate(ids, max_tokens=1), lambda: m.stream(ids)):
        with pytest.raises(efedge.ContextLengthError, match=rf"\b{n}\b.*\b32\b"):
            call()  # stream() raises at the call, not at the first next()


def test_long_text_and_chat_prompts_are_context_errors(m):
    with pytest.raises(efedge.ContextLengthError, match=r"\b32\b"):
        m.generate("word " * 200, max_tokens=1)
    with pytest.raises(efedge.ContextLengthError, match=r"\b32\b"):
        m.chat([{"role": "user", "content": "word " * 200}], max_tokens=1)


def test_generation_stops_at_the_end_of_the_context(m):
    from efedge.generate import GenerationResult

    res = GenerationResult([], "")
    text = "".join(m.stream(list(range(1, 31)), max_tokens=50, temperature=0, result=res))
    assert isinstance(text, str)
    # 30 + 2 tokens fill the KV cache; the token sampled from the last logits needs no room
    assert res.finish_reason in ("length", "stop") and len(res.tokens) <= 32 - 30 + 1


@pytest.mark.parametrize("n_ctx", [0, -1, 1.5, "4096", True])
def test_invalid_n_ctx_is_named(path, n_ctx):
    with pytest.raises(efedge.ContextLengthError, match="n_ctx|context size"):
        efedge.load(path, n_ctx=n_ctx)


def test_a_context_no_machine_can_hold_is_a_context_error(path):
    with pytest.raises(efedge.ContextLengthError, match=r"1099511627776 tokens.*GiB"):
        efedge.load(path, n_ctx=2**40)


# -- sampling and other arguments -------------------------------------------------------
BAD_SAMPLING = [
    ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "hot"), ("temperature", None), ("top_k", -1), ("top_k", 1.5),
    ("top_k", True), ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan), ("min_p", -0.1),
    ("min_p", 2), ("repeat_penalty", 0), ("repeat_penalty", -1), ("repeat_penalty", math.inf),
    ("repeat_last_n", -2), ("repeat_last_n", 1.5), ("seed", -1), ("seed", 1.5), ("seed", "x"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SAMPLING)
def test_invalid_sampling_values_name_the_parameter(m, name, value):
    for call in (lambda: m.generate("hi", max_tokens=1, **{name: value}),
                 lambda: m.stream("hi", **{name: value}),
                 lambda: m.chat(MSGS, max_tokens=1, **{name: value})):
        with pytest.raises(efedge.SamplingError, match=name) as info:
            call()
        assert isinstance(info.value, ValueError)  # catchable as either


def test_other_bad_arguments_are_named(m, path):
    cases = [
        (lambda: m.generate("hi", tmperature=0.5), TypeError, "tmperature"),
        (lambda: m.generate("hi", max_tokens=-1), ValueError, "max_tokens"),
        (lambda: m.generate("hi", max_tokens="5"), ValueError, "max_tokens"),
        (lambda: m.generate("hi", stop=[1]), efedge.ArgumentError, "stop"),
        # (not a list: a TypeError that named no parameter)
        (lambda: m.generate("hi", stop=5), efedge.ArgumentError, "stop must be"),
        (lambda: efedge.load(path, progress=5), efedge.ArgumentError, "progress"),
        # a look-ahead past what the predictor's tables hold (it asked for 291 TiB)
        (lambda: efedge.load(path, cache="50%", policy="fixed:999999"),
         efedge.ArgumentError, r"H from 1 to 32"),
        (lambda: efedge.load(path, cache="lots"), efedge.CacheBudgetError, "lots"),
        (lambda: efedge.load(path, cache=math.nan), efedge.CacheBudgetError, "nan"),
        (lambda: efedge.load(path, cache=math.inf), efedge.CacheBudgetError, "inf"),
        (lambda: efedge.load(path, cache="1" + "0" * 400 + "MiB"), efedge.CacheBudgetError,
         "finite"),
        (lambda: efedge.load(path, cache=1), efedge.CacheBudgetError, "minimum"),
        (lambda: efedge.load(path, cache="50%", policy="psychic"), efedge.EfedgeError,
         "psychic"),
        (lambda: efedge.load(path, cache="50%", link="warp"), efedge.EfedgeError, "warp"),
        (lambda: efedge.load(path, device="tpu"), efedge.UnsupportedModelError, "tpu"),
        # "cuda:" and then not an index reached torch.device: a RuntimeError traceback
        (lambda: efedge.load(path, device="cuda:x"), efedge.UnsupportedModelError, "cuda:x"),
        (lambda: efedge.load(path, device="cuda:-1"), efedge.UnsupportedModelError, "cuda:-1"),
        (lambda: efedge.load(path, threads=0), ValueError, "threads"),
        (lambda: efedge.load(path.parent), efedge.ModelFormatError, "cannot open"),
        (lambda: efedge.load(path.parent / "missing.gguf"), efedge.ModelFormatError,
         "cannot open"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()


@pytest.mark.parametrize("budget", [10**30, "99999999999999999999999999GB"])
def test_a_budget_past_any_size_holds_every_expert(path, budget):
    """(the slot count overflowed int64: an OverflowError traceback)"""
    with efedge.load(path, cache=budget) as m:
        s = m.stats()
        assert s["cache_slots"] == m.config.n_layer * m.config.n_expert


# -- unknown architecture, tokenizer and quant types ------------------------------------
def _string_value_offset(src, key: str) -> int:
    field = gguf.GGUFReader(src).fields[key]
    return field.offset + 8 + len(key.encode()) + 4 + 8


def _patched(src, dst, patches: list[tuple[int, bytes]]):
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        for off, data in patches:
            fh.seek(off)
            fh.write(data)
    return dst


def _type_offset(src, tensor: str) -> int:
    for t in gguf.GGUFReader(src).tensors:
        if t.name == tensor:
            return t.field.offset + 8 + len(tensor.encode()) + 4 + 8 * len(t.shape)
    raise KeyError(tensor)


def test_unknown_architecture_is_named(path, tmp_path):
    off = _string_value_offset(path, "general.architecture")
    bad = _patched(path, tmp_path / "arch.gguf", [(off, b"qwen9moe")])
    with pytest.raises(efedge.UnsupportedModelError, match="qwen9moe"):
        efedge.load(bad)


def test_unknown_tokenizer_is_named(path, tmp_path):
    off = _string_value_offset(path, "tokenizer.ggml.model")
    bad = _patched(path, tmp_path / "tok.gguf", [(off, b"gpt3")])
    with pytest.raises(efedge.UnsupportedModelError, match="gpt3.*tokenizer.ggml.model"):
        efedge.load(bad)


@pytest.mark.parametrize(("base", "tensor", "qtype", "words"), [
    ("Q4_K_M", "blk.0.attn_q.weight", 40, ["NVFP4", "blk.0.attn_q.weight"]),
    ("Q4_K_M", "blk.1.ffn_up_exps.weight", 40, ["NVFP4", "blk.1.ffn_up_exps.weight"]),
    ("F16", "blk.0.attn_norm.weight", 26, ["I32", "blk.0.attn_norm.weight"]),
    ("F16", "output.weight", 200, ["200", "output.weight"]),
])
def test_unsupported_quant_type_is_named(tiny_gguf, tmp_path, base, tensor, qtype, words):
    src = tiny_gguf("qwen3moe", base, **TINY)
    bad = _patched(src, tmp_path / "q.gguf", [(_type_offset(src, tensor), struct.pack("<I",
                                                                                     qtype))])
    with pytest.raises(efedge.UnsupportedModelError) as info:
        efedge.load(bad, cache="100%")
    for w in words:
        assert w in str(info.value)


# -- chat templates ---------------------------------------------------------------------
@pytest.mark.parametrize("template", [
    "{{ raise_exception('roles must alternate') }}",  # the template refuses
    "{% for %}",  # does not compile
    "{{ messages[5].content }}",  # index out of range
    "{{ foo.bar.baz }}",  # undefined
    "{{ ''.__class__.__mro__ }}",  # sandbox
])
def test_a_failing_template_is_a_template_error_with_the_fallback(path, template):
    with efedge.load(path, chat_template=template) as bad:
        with pytest.raises(efedge.TemplateError, match='chat_template="chatml"'):
            bad.chat(MSGS, max_tokens=1)
    with efedge.load(path, chat_template="chatml") as good:  # the fallback it offers works
        assert isinstance(good.chat(MSGS, max_tokens=2, temperature=0), str)


def test_a_broken_template_in_the_file_offers_the_fallback(path, tmp_path):
    off = _string_value_offset(path, "tokenizer.chat_template")
    bad = _patched(path, tmp_path / "tmpl.gguf", [(off, b"{% for %}")])
    with efedge.load(bad) as model:
        with pytest.raises(efedge.TemplateError, match='chat_template="chatml"'):
            model.chat(MSGS, max_tokens=1)
    with efedge.load(bad, chat_template="chatml") as model:
        assert isinstance(model.chat(MSGS, max_tokens=2, temperature=0), str)


def test_unknown_template_name_lists_the_builtins(path):
    with efedge.load(path, chat_template="nosuch") as model:
        with pytest.raises(efedge.TemplateError, match="nosuch.*chatml"):
            model.chat(MSGS)


@pytest.mark.parametrize(("messages", "word"), [
    ("hello", "messages"), ([1], r"messages\[0\]"), ([{"role": 1, "content": "x"}], "role"),
    ([{"role": "user", "content": 5}], "content"), (None, "messages"),
])
def test_malformed_messages_are_named(m, messages, word):
    with pytest.raises(efedge.TemplateError, match=word):
        m.chat(messages, max_tokens=1)


# -- token ids and prompts --------------------------------------------------------------
def test_token_ids_out_of_range_are_named(m):
    v = m.n_vocab
    for call, bad in [(lambda: m.logits([1, -1]), -1), (lambda: m.logits([v]), v),
                      (lambda: m.generate([1, v + 5], max_tokens=1), v + 5),
                      (lambda: m.detokenize([v]), v), (lambda: m.detokenize([-1]), -1)]:
        with pytest.raises(efedge.ArgumentError, match=rf"token id {bad}\b.*({v}|{v - 1})"):
            call()
    for bad in ("a", 1.5, None):
        with pytest.raises(TypeError, match="token id"):
            m.detokenize([bad])
    # not a sequence: None failed inside list(), a string's characters were taken as ids
    for bad in (None, "ab", 7):
        with pytest.raises(TypeError, match="sequence of token ids"):
            m.detokenize(bad)


def test_the_forward_pass_checks_its_token_ids(m):
    """Below the API: the embedding lookup does not bounds-check, so Transformer.forward
    refuses an id outside the vocabulary (and an empty batch) before any kernel runs, and
    the KV cache is left as it was."""
    from efedge.model import new_kv_cache

    v, tf = m.n_vocab, m._tf
    kv = new_kv_cache(m.config, 8)
    for bad, words in [([1, v], rf"token id {v} is outside the vocabulary \(0..{v - 1}\)"),
                       ([-3], r"token id -3 is outside"), ([], "at least one token")]:
        with pytest.raises(ValueError, match=words):
            tf.forward(bad, 0, kv)
        assert kv.n_past == 0
    assert m.config.token_ids((2, 3)).tolist() == [2, 3]


def test_tokenize_flags_must_be_booleans(m):
    """add_special="no" was true (any non-empty string is): a bool is asked for."""
    with pytest.raises(TypeError, match="add_special must be True or False, got 'no'"):
        m.tokenize("x", add_special="no")
    with pytest.raises(TypeError, match="parse_special"):
        m.tokenize("x", parse_special=1)
    assert m.tokenize("x", add_special=np.bool_(False)) == m.tokenize("x", add_special=False)


def test_empty_prompts_are_refused(m):
    for call in (lambda: m.generate(""), lambda: m.generate([]), lambda: m.stream(""),
                 lambda: m.logits([])):
        with pytest.raises(ValueError, match="empty|at least one"):
            call()


def test_valid_prompt_types_work(m):
    ids = [1, 2, 3]
    want = m.generate(ids, max_tokens=3, temperature=0)
    assert m.generate(tuple(ids), max_tokens=3, temperature=0) == want
    assert m.generate(np.array(ids), max_tokens=3, temperature=0) == want
    assert isinstance(m.generate("hi", max_tokens=3, temperature=0), str)
    with pytest.raises(TypeError, match="str"):
        m.tokenize(None)


@pytest.mark.parametrize("prompt", [b"hi", bytearray(b"hi"), None, 123, 3.5, {"a": 1},
                                    object()])
def test_non_string_prompts_are_type_errors_naming_the_prompt(m, prompt):
    with pytest.raises(TypeError, match="prompt"):
        m.generate(prompt, max_tokens=1)


@pytest.mark.parametrize("ids", [[1.7], ["12"], [True], [2**70], [[1, 2]]])
def test_token_ids_must_be_integers(m, ids):
    with pytest.raises((TypeError, ValueError), match="token id"):
        m.logits(ids)


# -- the command line -------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `efedge ARGV` run in this process (argparse's
    refusals exit with status 2)."""
    from efedge.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_input")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("")
    return {"missing": d / "missing.txt", "latin1": d / "latin1.txt", "dir": d,
            "empty": d / "empty.txt"}


BAD_CLI = [  # (arguments after the model, what stderr must name)
    (["-p", "x", "-t", "0"], r"threads.*positive integer, got 0"),
    (["-p", "x", "-t", "two"], r"threads.*'two'"),
    (["-p", "x", "--routing", "cache-aware", "--routing-slack", "2"], r"routing-slack.*\(0, 1\)"),
    (["-p", "x", "--routing-slack", "nan"], r"routing-slack"),
    (["-p", ""], r"prompt is empty.*no BOS token"),
    ([], r"prompt is empty.*-p TEXT"),
    (["-f", "{empty}"], r"prompt file '.*empty.txt' is empty"),
    (["-p", "x", "-n", "-2"], r"n-predict.*-1.*got -2"),
    (["-f", "{missing}"], r"cannot read prompt file '.*missing.txt': No such file"),
    (["-f", "{latin1}"], r"latin1.txt': not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (["-f", "{dir}"], r"cannot read prompt file .*: Is a directory"),
    # a byte that is not UTF-8 in the argument (Python's surrogateescape): it reached the
    # tokenizer, whose "lone surrogate" ValueError was a traceback
    (["-p", "caf\udce9"], r"the prompt is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (["-p", "x", "-st", "-sys", "\udcff"],
     r"the system prompt is not UTF-8 text \(byte 0xff at offset 0\)"),
    (["-p", "x", "--stop", "a\udcff"], r"--stop string is not UTF-8 text \(byte 0xff"),
    (["-p", "x", "--cache", "50%", "--policy", "fixed:33"], r"H from 1 to 32"),
    # a typo of fixed:H ran as plain fixed (H = 2)
    (["-p", "x", "--cache", "50%", "--policy", "fixed32"], r"unknown cache policy 'fixed32'"),
    (["-p", "x", "--cache", "50%", "--policy", "fixedfoo"], r"unknown cache policy 'fixedfoo'"),
]


@pytest.mark.parametrize(("argv", "word"), BAD_CLI)
def test_bad_run_arguments_are_one_line_errors(path, files, capsys, argv, word):
    rc, _, err = _cli(["run", path, *(a.format(**files) for a in argv)], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert re.search(word, err), err


def test_bench_refuses_zero_threads(path, capsys):
    rc, _, err = _cli(["bench", path, "-t", "0", "-p", "16", "-n", "8"], capsys)
    assert rc == 2 and "Traceback" not in err and re.search(r"threads.*≥ 1", err), err


def test_run_n_minus_one_generates_until_the_end_or_a_full_context(path, capsys):
    """-n -1, as in llama.cpp and `efedge chat`: no limit but the end of text and the
    context (here longer than the default 128 tokens)."""
    from efedge.generate import GenerationResult

    n_ctx = 160
    with efedge.load(path, n_ctx=n_ctx) as model:
        res = GenerationResult([], "")
        want = "".join(model.stream("hi", max_tokens=n_ctx, temperature=0, result=res))
    assert res.finish_reason == "stop" or len(res.tokens) > 128, res
    rc, out, err = _cli(["run", path, "-p", "hi", "-n", "-1", "-c", n_ctx, "--temp", "0"],
                        capsys)
    assert rc == 0, err
    assert out == want + "\n"
    # the summary counts the tokens generated (not the decode steps) and why it ended
    assert f"generated {len(res.tokens)} tokens ({res.finish_reason})" in err, err


def test_verbose_adds_the_traceback_to_an_efedge_error(path, capsys):
    """README: a bad input is one line, `efedge -v …` adds the traceback — for the
    errors efedge raises on purpose too (it used to print only the line)."""
    argv = ["run", path, "-p", "x", "--cache", "1KiB"]
    rc, _, err = _cli(argv, capsys)
    assert rc == 1 and "Traceback" not in err and "CacheBudgetError" not in err, err
    assert err.startswith("efedge: error: cache budget"), err
    rc, _, err = _cli(["-v", *argv], capsys)
    assert rc == 1 and "Traceback" in err and "CacheBudgetError" in err, err
    assert err.rstrip().splitlines()[-1].startswith("efedge: error: cache budget"), err


def test_an_unexpected_os_error_is_one_line_and_bugs_stay_visible(path, capsys, monkeypatch):
    """The last-resort net in `efedge`'s main: an OSError the command did not wrap is
    one line (the traceback with -v); any other exception is a bug and propagates."""
    import efedge.cli.inspect as inspect_cli

    def denied(_path):
        raise PermissionError(13, "Permission denied", str(_path))

    monkeypatch.setattr(inspect_cli, "describe", denied)
    rc, _, err = _cli(["inspect", path], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("efedge: error: ") and "Permission denied" in err, err
    rc, _, err = _cli(["-v", "inspect", path], capsys)
    assert rc == 1 and "Traceback" in err and "PermissionError" in err, err

    def bug(_path):
        raise AttributeError("a bug")

    monkeypatch.setattr(inspect_cli, "describe", bug)
    with pytest.raises(AttributeError, match="a bug"):
        _cli(["inspect", path], capsys)


@pytest.mark.parametrize("flag", ["-p", "-f"])
def test_run_reads_the_prompt_from_standard_input(path, capsys, monkeypatch, flag):
    """`-p -` (mlx-lm's spelling) and `-f -` read the prompt from stdin: the same output as
    the prompt given on the command line; bad or empty input is one named line."""
    import io

    text = "hello wor"
    args = ["run", path, "-n", 4, "--temp", 0, "--echo"]
    rc, want, _ = _cli([*args, "-p", text], capsys)
    assert rc == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    rc, got, _ = _cli([*args, flag, "-"], capsys)
    assert rc == 0 and got == want and got.startswith(text)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ab\xffc")))
    rc, _, err = _cli([*args, flag, "-"], capsys)
    assert rc == 1 and "standard input: not UTF-8" in err and "0xff at offset 2" in err


def test_every_command_expands_a_tilde_in_its_paths(path, capsys, monkeypatch, tmp_path):
    """README: "`~` in a model or file path is expanded by efedge" (cmd.exe and PowerShell
    leave it to the program, a quoted path in any shell too). run did (efedge.load);
    inspect, bench, trace -o and simulate's TRACE looked for a folder named "~"."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))  # Windows' expanduser
    shutil.copy(path, home / "m.gguf")
    (home / "text.txt").write_text("def fib(n):\n    return n\n" * 4)
    rc, out, err = _cli(["inspect", "~/m.gguf"], capsys)
    assert rc == 0 and "qwen3moe" in out, err
    rc, out, err = _cli(["bench", "~/m.gguf", "-p", 4, "-n", 2, "-r", 1], capsys)
    assert rc == 0 and "pp4" in out, err
    rc, _, err = _cli(["trace", "~/m.gguf", "--text", "~/text.txt", "-o", "~/t.npz"], capsys)
    assert rc == 0 and (home / "t.npz").is_file(), err
    rc, out, err = _cli(["simulate", "~/t.npz", "--warmup", 2], capsys)
    assert rc == 0 and "| ondemand |" in out, err


def test_a_gpu_index_the_machine_lacks_is_named(path, monkeypatch):
    """device="cuda:N" past the last GPU passed every check and failed in torch's first
    allocation ("CUDA error: invalid device ordinal", a traceback). Here a machine with
    one GPU is what torch reports; the refusal comes before anything is allocated."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(efedge.UnsupportedModelError, match=r"cuda:3.*1 GPU.*cuda:0"):
        efedge.load(path, device="cuda:3")


# -- command-line edges ------------------------------------------------------------------------
def test_verbose_flag_before_or_after_the_command():
    """`efedge run … -v` as llama.cpp and mlx-lm users type it, and `efedge -v run …`."""
    from efedge.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "-p", "x", "-v"]).verbose is True
    assert p.parse_args(["-v", "run", "-p", "x"]).verbose is True
    assert p.parse_args(["run", "-p", "x"]).verbose is False
    assert p.parse_args(["simulate", "t.npz", "--verbose"]).verbose is True


def test_a_context_past_training_and_routing_without_a_cache_are_warned(path, caplog):
    with caplog.at_level(logging.WARNING, logger="efedge"):
        efedge.load(path, n_ctx=1024).close()
        efedge.load(path).close()
        assert caplog.text.count("larger than the 512 tokens") == 1
        efedge.load(path, routing="cache-aware").close()
        assert caplog.text.count("no effect without an expert cache") == 1
        # the CLI's default budget, "auto", that decides every expert is resident (the
        # demo model fits): warned once decided (it was not, found by an audit)
        efedge.load(path, routing="cache-aware", cache="auto").close()
    assert caplog.text.count("no effect without an expert cache") == 2


@pytest.mark.skipif(sys.platform == "win32", reason="a closed descriptor through sh")
def test_a_closed_stdout_is_not_a_traceback(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run(["sh", "-c", f'"{sys.executable}" -m efedge run "{path}" -p hi -n 1 '
                        ">&-"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_the_model_given_twice_is_an_error_and_inspect_takes_m(path, capsys):
    from efedge.cli import main as cli_main

    other = str(path) + ".other.gguf"
    assert cli_main(["run", str(path), "-m", other, "-p", "hi", "-n", "1"]) == 1
    err = capsys.readouterr().err
    assert "two models given" in err and other in err
    assert cli_main(["run", str(path), "-m", str(path), "-p", "hi", "-n", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", "-m", str(path), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["path"] == str(path)


def test_run_single_turn_through_the_chat_template(path, capsys):
    """run --chat (-st, llama-cli's single turn; mlx_lm.generate's default) takes the
    prompt as a user turn after an optional -sys turn; --max-tokens is mlx-lm's -n."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with efedge.load(path, n_ctx=128) as model:
        want = model.chat(turns, max_tokens=6, temperature=0)
        plain = model.generate("hi", max_tokens=6, temperature=0)
    rc, out, err = _cli(["run", path, "-p", "hi", "-st", "-sys", "Be brief.", "--max-tokens",
                         6, "-c", 128, "--temp", "0"], capsys)
    assert rc == 0 and out == want + "\n", err
    assert want != plain
    for argv, word in [(["-sys", "x"], "--chat"), (["--chat", "--echo"], "--echo")]:
        rc, _, err = _cli(["run", path, "-p", "hi", *argv], capsys)
        assert rc == 1 and word in err and "Traceback" not in err, err
