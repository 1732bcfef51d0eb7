"""Fill-in-the-middle: the markers found as llama.cpp finds them (ids equal to its
llama_vocab_fim_* on the same files), the prompt laid out and cut as llama.cpp's /infill
lays it out, greedy infilling equal to llama.cpp's on those ids, and the server's
/infill, /completion (llama-server's shapes) and OpenAI `suffix`."""

from __future__ import annotations

import time

import pytest
from _http import post, post_json, running_server, sse_chunks
from _scripted import script_tokens
from _vocab_fixtures import write_vocab_model

import efedge
from efedge import api_generation
from efedge.errors import UnsupportedModelError
from efedge.fim import infill_ids
from efedge.generate import GenerationResult

# Qwen2.5-Coder's markers; the suffix one typed NORMAL in the file, which llama.cpp (and
# efedge) turn into a control token because of its text
QWEN_FIM = [("<|fim_prefix|>", 3), ("<|fim_suffix|>", 1), ("<|fim_middle|>", 3),
            ("<|fim_pad|>", 3), ("<|repo_name|>", 3), ("<|file_sep|>", 3)]
NAMES = ("pre", "suf", "mid", "pad", "rep", "sep")
PREFIX, SUFFIX = "def area(r):\n    return ", "\n\nprint(area(2))\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fim")
    return {
        "qwen": write_vocab_model(d / "qwen.gguf", extra_tokens=QWEN_FIM),
        # DeepSeek-Coder's markers, no file separator (extra chunks get the snippet line)
        "deepseek": write_vocab_model(d / "ds.gguf", extra_tokens=[
            ("<｜fim▁begin｜>", 3), ("<｜fim▁hole｜>", 3), ("<｜fim▁end｜>", 3)]),
        # ids from the keys, on tokens whose text says nothing; older files' key names
        "keys": write_vocab_model(d / "keys.gguf", extra_tokens=[
            ("<a>", 3), ("<b>", 3), ("<c>", 3), ("<d>", 3)], extra_ids={
            "tokenizer.ggml.fim_pre_token_id": 513, "tokenizer.ggml.fim_suf_token_id": 512,
            "tokenizer.ggml.fim_mid_token_id": 515, "tokenizer.ggml.fim_sep_token_id": 514}),
        "legacy": write_vocab_model(d / "legacy.gguf", extra_tokens=[
            ("<a>", 3), ("<b>", 3), ("<c>", 3)], extra_ids={
            "tokenizer.ggml.prefix_token_id": 514, "tokenizer.ggml.suffix_token_id": 513,
            "tokenizer.ggml.middle_token_id": 512}),
        "none": write_vocab_model(d / "none.gguf"),
    }


def _llama_fim(path) -> dict:
    import llama_cpp
    import llama_ref

    vocab = llama_cpp.llama_model_get_vocab(llama_ref.make_llama(
        path, vocab_only=True, verbose=False).model)
    out = {}
    for n in NAMES:
        v = getattr(llama_cpp, f"llama_vocab_fim_{n}")(vocab)
        out[n] = None if v < 0 else int(v)
    return out


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("name", ["qwen", "deepseek", "keys", "legacy", "none"])
def test_markers_equal_llama_cpp(files, name):
    with efedge.load(files[name]) as m:
        assert m.tokenizer.fim_ids == _llama_fim(files[name])
        if name == "none":
            with pytest.raises(UnsupportedModelError, match="fill-in-the-middle"):
                m.infill_prompt(PREFIX, SUFFIX)


@pytest.mark.requires_llama_cpp
def test_a_marker_typed_normal_tokenizes_as_llama_cpp(files):
    """<|fim_suffix|> is NORMAL in the file: llama.cpp makes it a control token, so it is
    parsed as one token only with parse_special and rendered only on request."""
    import llama_ref

    text = "x<|fim_suffix|>y"
    with efedge.load(files["qwen"]) as m:
        ref = llama_ref.make_llama(files["qwen"], vocab_only=True, verbose=False)
        for special in (False, True):
            assert m.tokenize(text, add_special=False, parse_special=special) == \
                ref.tokenize(text.encode(), add_bos=False, special=special)


def test_layout_with_repo_markers_and_extra_files(files):
    with efedge.load(files["qwen"], n_ctx=4096) as m:
        ids = m.infill_prompt(PREFIX, SUFFIX, prompt="3.14", max_tokens=16, extra=[
            {"filename": "util.py", "text": "PI = 3.14\n"}, {"text": "x = 1\n"}])
        f = m.tokenizer.fim_ids

        def enc(s):
            return m.tokenize(s, add_special=False)
        want = ([f["rep"], *enc("myproject\n"), f["sep"], *enc("util.py\n"), *enc("PI = 3.14\n"),
                 f["sep"], *enc("tmp\n"), *enc("x = 1\n"), f["sep"], *enc("filename\n"),
                 f["pre"], *enc(PREFIX), *enc("3.14"), f["suf"], *enc(SUFFIX), f["mid"]])
        assert ids == want


def test_layout_without_a_file_separator_and_with_bos(files):
    with efedge.load(files["deepseek"], n_ctx=4096) as m:
        m.tokenizer.add_bos = True  # as a vocab that adds BOS (llama.cpp puts it here)
        f = m.tokenizer.fim_ids
        ids = m.infill_prompt(PREFIX, SUFFIX, extra=[{"filename": "a.py", "text": "y = 2\n"}])
        enc = m.tokenizer.encode
        want = (enc("\n\n--- snippet ---\n\n", False) + enc("y = 2\n", False)
                + [m.tokenizer.bos_id, f["pre"], *enc(PREFIX, False), f["suf"],
                   *enc(SUFFIX, False), f["mid"]])
        assert ids == want


def test_the_prompt_reads_special_tokens_the_parts_do_not(files):
    """llama-server tokenizes /infill's `prompt` with parse_special (a control token's
    text is the token), the prefix, suffix and extra files without (text is text)."""
    with efedge.load(files["qwen"], n_ctx=4096) as m:
        tok, f = m.tokenizer, m.tokenizer.fim_ids
        ids = m.infill_prompt("<|fim_pad|>", "b", prompt="x<|fim_pad|>")
        assert ids[ids.index(f["pre"]):] == [
            f["pre"], *tok.encode("<|fim_pad|>", False), *tok.encode("x", False), f["pad"],
            f["suf"], *tok.encode("b", False), f["mid"]]


def test_bad_max_tokens_are_named(files):
    """m.infill's max_tokens is checked as generate's is (it sizes the layout first, where
    None, a string or a float died in a comparison or a slice)."""
    with efedge.load(files["qwen"]) as m:
        for bad in (None, -1, "3", 3.5, True):
            with pytest.raises(efedge.ArgumentError, match="max_tokens"):
                m.infill("def f(", ")", max_tokens=bad)


def test_parts_are_cut_as_llama_cpp_cuts_them(files):
    with efedge.load(files["qwen"], n_ctx=4096) as m:
        tok, f = m.tokenizer, m.tokenizer.fim_ids
        pre, suf = tok.encode("a b c d e f g h i j k l m n o p " * 3, False), \
            tok.encode("q r s t u v w x y z " * 3, False)
        prompt = tok.encode("zz", False)
        extra_ids = [f["rep"], *tok.encode("myproject\n", False), f["sep"],
                     *tok.encode("filename\n", False)]
        ids = infill_ids(tok, tok.decode(pre), tok.decode(suf), prompt="zz", n_ctx=40,
                         n_predict=2, n_batch=32)
        # prefix: its last 3·32/4 = 24 tokens; suffix: its first 32/4 − 2 − len(prompt);
        # extra: its last 40 − 32 − 2·2 = 4 tokens
        n_suf = 8 - 2 - len(prompt)
        assert ids == (extra_ids[-4:] + [f["pre"], *pre[-24:], *prompt, f["suf"],
                                         *suf[:n_suf], f["mid"]])
        # a context smaller than a batch and the answer: the batch shrinks to fit
        small = infill_ids(tok, tok.decode(pre), tok.decode(suf), n_ctx=64, n_predict=16)
        assert len(small) + 16 <= 64 and small[-1] == f["mid"]
        # an answer longer than the context: laid out as one of no given length (the
        # prefix was cut to 6 tokens to leave room for it)
        for n in (256, 10**6):
            assert infill_ids(tok, tok.decode(pre), tok.decode(suf), n_ctx=256,
                              n_predict=n) == infill_ids(tok, tok.decode(pre), tok.decode(suf),
                                                         n_ctx=256)
        # full parts and extra files with no n_predict (0) or 1: room for the answer's
        # first token still (llama.cpp's budget counts no markers: 1 over the context)
        for n in (0, 1, 2):
            full = infill_ids(tok, "a b c d " * 300, "e f g h " * 300, n_ctx=256,
                              n_predict=n, extra=[{"text": "z y " * 500}])
            assert len(full) + max(1, n) <= 256 and full[-1] == f["mid"], (n, len(full))


@pytest.mark.requires_llama_cpp
def test_greedy_infill_matches_llama_cpp(files):
    import llama_ref

    with efedge.load(files["qwen"]) as m:
        ids = m.infill_prompt(PREFIX, SUFFIX, max_tokens=12)
        r = GenerationResult([], "")
        text = m.infill(PREFIX, SUFFIX, max_tokens=12, temperature=0, result=r)
        assert r.tokens and text == m.detokenize(r.tokens)
        assert r.tokens == llama_ref.llama_greedy(files["qwen"], ids, len(r.tokens))
        pieces = m.infill(PREFIX, SUFFIX, max_tokens=12, temperature=0, stream=True)
        assert "".join(pieces) == text


def test_server_routes(files):
    with efedge.load(files["qwen"], n_ctx=1024) as m:
        # (the server lays the prompt out for no n_predict, as llama-server does)
        want = m.generate(m.infill_prompt(PREFIX, SUFFIX), temperature=0, max_tokens=6)
        with running_server(m) as srv:
            body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6,
                    "temperature": 0, "cache_prompt": True, "samplers": ["top_k", "infill"]}
            status, got = post_json(srv, "/infill", body)
            assert status == 200, got
            assert got["content"] == want and got["stop"] is True
            assert got["stop_type"] == "limit" and got["tokens_predicted"] == 6
            assert got["tokens_evaluated"] == len(m.infill_prompt(PREFIX, SUFFIX))
            assert got["generation_settings"]["n_predict"] == 6
            status, text = post(srv, "/infill", dict(body, stream=True))
            chunks = sse_chunks(text)
            assert status == 200 and "[DONE]" not in text
            assert all(c["stop"] is False for c in chunks[:-1]) and chunks[-1]["stop"] is True
            assert "".join(c["content"] for c in chunks) == want
            # OpenAI's insertion: the prompt before the gap, the suffix after it
            status, got = post_json(srv, "/v1/completions", {
                "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6, "temperature": 0})
            assert status == 200 and got["choices"][0]["text"] == want, got
            # llama.cpp's /completion, a stop string named as the one that ended it
            plain = m.generate("def f(x):", max_tokens=8, temperature=0)
            word = plain[2:4]
            status, got = post_json(srv, "/completion", {
                "prompt": "def f(x):", "n_predict": 8, "temperature": 0, "stop": [word],
                "return_tokens": True, "logit_bias": [[5, False]]})
            assert status == 200, got
            assert got["content"] == m.generate("def f(x):", max_tokens=8, temperature=0,
                                                stop=[word], logit_bias={5: float("-inf")})
            assert got["stop_type"] == "word" and got["stopping_word"] == word, got
            assert got["tokens"] and all(isinstance(t, int) for t in got["tokens"])
            assert got["generation_settings"]["logit_bias"] == [[5, False]]
            for path, bad, param in [
                    ("/infill", {"input_prefix": 5}, "input_prefix"),
                    ("/infill", {"input_prefix": "x", "input_extra": [{"text": 1}]},
                     "input_extra"),
                    ("/infill", {"input_prefix": "x", "input_extra": [{"filename": "a"}]},
                     "input_extra"),
                    ("/completion", {"prompt": "x", "n_probs": 3}, "n_probs"),
                    ("/completion", {"n_predict": 3}, "prompt"),
                    ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, "prompt"),
                    # (the prompt run is the FIM layout: the echoed text's log
                    # probabilities would be the markers' and the suffix's)
                    ("/v1/completions", {"prompt": "a", "suffix": "b", "echo": True,
                                         "logprobs": 1}, "echo")]:
                status, got = post_json(srv, path, bad)
                assert status == 400 and got["error"]["param"] == param, (path, got)
            assert post(srv, "/infill", [1, 2])[0] == 400  # not an object


def test_server_without_markers_refuses_infill(files):
    with efedge.load(files["none"]) as m, running_server(m) as srv:
        for path, body, param in [("/infill", {"input_prefix": "a"}, "input_prefix"),
                                  ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix")]:
            status, got = post_json(srv, path, body)
            assert status == 400 and got["error"]["code"] == "unsupported", got
            assert got["error"]["param"] == param and "fill-in-the-middle" in \
                got["error"]["message"]


def test_streamed_native_chunks_count_their_tokens(files):
    """As llama-server's: each /completion and /infill chunk carries tokens_predicted (the
    tokens generated when it went out; it had only tokens_evaluated), with return_tokens
    its own ids (every chunk's and the last event's, joined, are the reply's ids), and
    the totals carry the prompt's text."""
    with efedge.load(files["qwen"], n_ctx=4096) as m, running_server(m) as srv:
        for path, body, prompt_ids in [
                ("/completion", {"prompt": "def f(x):"}, m.tokenize("def f(x):")),
                ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX},
                 m.infill_prompt(PREFIX, SUFFIX))]:
            body = dict(body, n_predict=8, temperature=0, return_tokens=True)
            status, whole = post_json(srv, path, body)
            assert status == 200 and len(whole["tokens"]) == whole["tokens_predicted"] == 8
            assert whole["prompt"] == m.detokenize(prompt_ids)
            status, text = post(srv, path, dict(body, stream=True))
            *chunks, last = sse_chunks(text)
            assert status == 200 and chunks and last["stop"] is True
            counts = [c["tokens_predicted"] for c in chunks]
            assert counts == sorted(counts) and 0 < counts[0] and counts[-1] <= 8, counts
            assert all(c["tokens_evaluated"] == len(prompt_ids) for c in chunks)
            assert [len(t) for c in chunks for t in [c["tokens"]]] == [
                b - a for a, b in zip([0, *counts], counts, strict=False)]
            assert sum((c["tokens"] for c in chunks), []) + last["tokens"] == whole["tokens"]
            assert last["tokens_predicted"] == 8 and last["content"] == ""
            assert last["prompt"] == whole["prompt"]
            # without return_tokens, no ids (as before), the counts all the same
            status, text = post(srv, path, dict(body, stream=True, return_tokens=False))
            assert all(c["tokens"] == [] for c in sse_chunks(text))
            assert [c.get("tokens_predicted") for c in sse_chunks(text)[:-1]] == counts


def test_infill_lays_out_the_prompt_whatever_the_requests_n_predict(files, monkeypatch):
    """As llama-server's /infill: the extra files are cut to the budget of the server's
    n_predict (none: efedge serve has no -n), not the request's, which bounds the answer
    only — so a request gets the prompt llama-server would run (a large n_predict cut
    the extra files short)."""
    extra = [{"filename": "util.py", "text": "def helper(x):\n    return x + 1\n" * 200}]
    with efedge.load(files["qwen"], n_ctx=4096) as m, running_server(m) as srv:
        _script_text(monkeypatch, m, "x")  # (the prompt is tested, not the answer)
        ids = m.infill_prompt(PREFIX, SUFFIX, extra=extra)
        assert len(ids) != len(m.infill_prompt(PREFIX, SUFFIX, extra=extra, max_tokens=512))
        status, got = post_json(srv, "/infill", {
            "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
            "n_predict": 512})
        assert status == 200 and got["tokens_evaluated"] == len(ids), got
        assert got["prompt"] == m.detokenize(ids)


def _script_text(monkeypatch, m, text: str, delay: float = 0.0) -> None:
    """Generations write `text`, one token per character (a `delay` before each)."""
    ids = [t for ch in text for t in m.tokenize(ch, add_special=False)]
    assert len(ids) == len(text) and m.detokenize(ids) == text
    script_tokens(monkeypatch, ids)
    scripted = api_generation.generate_tokens

    def slow(*a, **kw):
        for tok in scripted(*a, **kw):
            time.sleep(delay)
            yield tok

    monkeypatch.setattr(api_generation, "generate_tokens", slow)


REPLY = "x)\n    return 1\n  y = 2\nz"


@pytest.mark.parametrize("extra, content", [
    ({"n_indent": 4}, "x)\n    return 1\n  "),  # the line less indented: cut at its text
    ({"n_indent": 2}, REPLY[:-1]),
    ({"n_indent": 1}, REPLY[:-1]),
    ({"n_indent": 0}, REPLY),
    ({}, REPLY),
])
def test_native_n_indent_ends_the_reply(files, monkeypatch, extra, content):
    """llama-server's n_indent (llama.vscode sends the cursor line's): the reply stops
    ("limit") at the first line after its first newline indented less (spaces and tabs;
    an empty line is indented 0), that line's text dropped — streamed the same. It was
    ignored."""
    with efedge.load(files["qwen"]) as m, running_server(m) as srv:
        _script_text(monkeypatch, m, REPLY)
        body = dict(extra, input_prefix="def f(", input_suffix="")
        status, got = post_json(srv, "/infill", body)
        assert status == 200 and got["content"] == content, got
        assert got["stop_type"] == ("eos" if content == REPLY else "limit")
        status, text = post(srv, "/infill", dict(body, stream=True))
        assert "".join(c["content"] for c in sse_chunks(text)) == content
        if extra.get("n_indent") == 1:  # an empty line is less indented than 1
            _script_text(monkeypatch, m, "a\n b\n\n c")
            assert post_json(srv, "/completion", dict(extra, prompt="x"))[1][
                "content"] == "a\n b\n"


def test_native_t_max_predict_ms_ends_the_reply_at_a_newline(files, monkeypatch):
    """llama-server's t_max_predict_ms: once the generation has run that long, the next
    piece with a newline is its last ("limit"). It was accepted and ignored."""
    with efedge.load(files["qwen"]) as m, running_server(m) as srv:
        _script_text(monkeypatch, m, "ab\ncd\nef", delay=0.05)
        body = {"input_prefix": "x", "t_max_predict_ms": 30}
        status, got = post_json(srv, "/infill", body)
        assert status == 200 and got["content"] == "ab\n", got
        assert got["stop_type"] == "limit" and got["tokens_predicted"] == 3
        status, got = post_json(srv, "/infill", dict(body, t_max_predict_ms=0))
        assert got["content"] == "ab\ncd\nef" and got["stop_type"] == "eos", got
        for bad in ({"n_indent": -1}, {"n_indent": 1.5}, {"t_max_predict_ms": "1"}):
            status, got = post_json(srv, "/completion", dict(bad, prompt="x"))
            assert status == 400 and got["error"]["param"] == next(iter(bad)), got
