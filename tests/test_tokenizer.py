"""efedge.tokenizer against llama.cpp (llama-cpp-python, vocab_only) on the same tiny files."""

from __future__ import annotations

import ctypes
import time

import pytest

from efedge.errors import ArgumentError, ModelFormatError, UnsupportedModelError
from efedge.gguf_file import GGUFFile
from efedge.tokenizer import Tokenizer
from gguf_tools.vocab import BPE_CONTROL, add_vocab, bpe_vocab, spm_vocab, training_text
from tests._vocab_fixtures import pair_vocab, write_vocab_model

CODE = (
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
    "    if n < 2:\n\t\treturn n  # tabs\n    return fib(n - 1) + fib(n - 2)\n\n\n"
)
MIXED = CODE + (
    "café naïve Straße — 🤖👍🏽 日本語のテキスト 中文 한국어\n"
    "12345 3.14159 1000000   multiple   spaces\t\ttabs \n\n \r\n end  "
    "I'm we'll they've DON'T it's $x+=1; a|b ~c^d `f` ¡g! «i» \u00a0\u3000x\u200dy "
)
SPECIAL = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<s>x</s><unk> <|endoftext|>"
TEXTS = (MIXED, SPECIAL, MIXED + SPECIAL, " leading space", "", "a", "\n\n", "  ")

# name → (kind, tokenizer.ggml.pre, add_bos_token written or None for llama.cpp's default)
FILES = {
    "bpe-gpt2": ("bpe", "gpt-2", False),
    "bpe-llama3": ("bpe", "llama-bpe", None),
    "bpe-qwen2": ("bpe", "qwen2", None),
    "bpe-default": ("bpe", None, True),
    "bpe-deepseek": ("bpe", "deepseek-llm", None),
    "spm": ("spm", None, None),
    "spm-nobos": ("spm", None, False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return {name: write_vocab_model(d / f"{name}.gguf", kind=k, pre=pre, add_bos=bos)
            for name, (k, pre, bos) in FILES.items()}


def _tok(path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(path).metadata)


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", list(FILES))
def test_ids_match_llama_cpp(files, name):
    tok, llm = _tok(files[name]), _llama(files[name])
    for text in TEXTS:
        for add_special in (True, False):
            for parse_special in (True, False):
                ref = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
                got = tok.encode(text, add_special=add_special, parse_special=parse_special)
                assert got == ref, (name, text[:40], add_special, parse_special)


@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-llama3", "spm"])
def test_fuzz_matches_llama_cpp(files, name):
    import random

    tok, llm = _tok(files[name]), _llama(files[name])
    pool = list("abcXYZ019 \n\t\r'\".,;:!?()<>|$+=-_#~^`") + list("éüßñΩ日本한🤖🏽²½")
    pool += ["\u00a0", "\u3000", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "'s", "'LL",
             "    ", "\n\n"]
    src = training_text()
    rng = random.Random(1)
    for i in range(300):
        if i % 3 == 0:
            at = rng.randrange(len(src) - 400)
            text = src[at:at + rng.randrange(400)]
        else:
            text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 30)))
        ps = rng.random() < 0.5
        assert tok.encode(text, True, ps) == llm.tokenize(text.encode(), True, ps), text


@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-llama3", "bpe-qwen2", "spm", "spm-nobos"])
def test_bos_eog_and_pieces_match_llama_cpp(files, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    tok, llm = _tok(files[name]), _llama(files[name])
    vocab = llm._model.vocab
    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(vocab)
    assert tok.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    assert tok.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert tok.eos_id == llama_cpp.llama_vocab_eos(vocab)
    assert (tok.encode("hi")[:1] == [tok.bos_id]) == tok.add_bos
    eog = {t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert tok.eog_ids == eog
    buf = (ctypes.c_char * 256)()
    for t in range(tok.n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, 256, 0, True)
        assert tok.token_bytes(t) == bytes(buf[:n]), t
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, 256, 0, False)
        assert (b"" if tok.is_special(t) else tok.token_bytes(t)) == bytes(buf[:n]), t


def test_expected_defaults(files):
    assert _tok(files["bpe-gpt2"]).add_bos is False
    assert _tok(files["bpe-llama3"]).add_bos is True  # llama-bpe defaults to BOS
    assert _tok(files["bpe-qwen2"]).add_bos is False
    assert _tok(files["spm"]).add_bos is True
    assert _tok(files["spm-nobos"]).add_bos is False
    tok = _tok(files["bpe-gpt2"])
    ids = {tok.token_to_id[t] for t in BPE_CONTROL}
    assert {tok.token_to_id["<|im_end|>"], tok.token_to_id["<|endoftext|>"]} <= tok.eog_ids
    assert tok.encode(SPECIAL, add_special=False, parse_special=True)[0] in ids
    assert not ids & set(tok.encode(SPECIAL, add_special=False, parse_special=False))


def test_user_defined_tokens_match_llama_cpp(tmp_path):
    path = write_vocab_model(tmp_path / "ud.gguf", "bpe", "qwen2", add_bos=False,
                             extra_tokens=[("<tool_call>", 4), ("<|custom|>", 3),
                                           ("<|custom|>x", 4)])
    tok, llm = _tok(path), _llama(path)
    text = "a<tool_call>{x}</tool_call> <|custom|>x <|custom|> b<tool_call>"
    for ps in (True, False):
        assert tok.encode(text, False, ps) == llm.tokenize(text.encode(), False, ps)
    # user-defined tokens are split out even without parse_special
    assert tok.token_to_id["<tool_call>"] in tok.encode(text, False, False)
    assert tok.decode(tok.encode(text, False, True)) == text


def test_eog_detection_matches_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    extra = [("<|eot_id|>", 3), ("<|eom_id|>", 3), ("<|end|>", 3), ("<|return|>", 3),
             ("<|call|>", 3), ("<|fim_pad|>", 1), ("<|channel|>", 3), ("<end_of_turn>", 4)]
    path = write_vocab_model(tmp_path / "eog.gguf", "bpe", "llama-bpe", add_bos=True,
                             extra_tokens=extra)
    tok, llm = _tok(path), _llama(path)
    vocab = llm._model.vocab
    assert tok.eog_ids == {t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert tok.token_to_id["<|end|>"] not in tok.eog_ids  # gpt-oss: <|end|> is not EOG
    text = "".join(t for t, _ in extra) + " x<|im_end|>"
    for ps in (True, False):
        assert tok.encode(text, True, ps) == llm.tokenize(text.encode(), True, ps)
    ids = tok.encode(text, False, True)
    assert tok.decode(ids, skip_special=True) == llm.detokenize(ids).decode()


# One tokenizer.ggml.pre name per regex family of efedge.tokenizer_tables (and "hunyuan",
# Hunyuan-A13B's: llama.cpp gives it a pre type of its own, split as qwen2).
PRE_FAMILIES = ("gpt-2", "llama-bpe", "dbrx", "qwen2", "starcoder", "falcon", "default",
                "deepseek-llm", "deepseek-coder", "gpt-4o", "deepseek-v3", "bailingmoe", "hunyuan",
                "kimi-k2", "afmoe")
SPLIT_POOL = (list("aZ09 .,!?'\"-_$+<=>^~|`()[]{}@#%*/\\:;\n\t\r") + ["'s", "'LL", "\r\n"]
              + list("日本中文한어アです。、「」！（）①²½→€×µΩЖ١\u0301\u200d🤖🏽")
              + ["Hello", "WORLD", "iPhone", "ÀÉé", "ΓΔγ", "ǅ", "'Re", "/"]
              + ["\u00a0", "\u1680", "\u2000", "\u2003", "\u200a", "\u2028", "\u202f",
                 "\u205f", "\u3000", "\x85", "\x0b", "\x1f", "12345", "    "])


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    v = pair_vocab("".join(SPLIT_POOL))
    return {pre: write_vocab_model(d / f"{pre}.gguf", "bpe", pre, add_bos=False, bpe=v)
            for pre in PRE_FAMILIES}


@pytest.mark.parametrize("pre", PRE_FAMILIES)
def test_pre_tokenizer_splits_match_llama_cpp(pair_files, pre):
    """Every pre-tokenizer family on a vocab whose ids show each word boundary: random
    mixes of scripts, digits, punctuation, contractions and (non-ASCII) whitespace."""
    import random

    tok, llm = _tok(pair_files[pre]), _llama(pair_files[pre])
    rng = random.Random(pre)
    for _ in range(250):
        text = "".join(rng.choice(SPLIT_POOL) for _ in range(rng.randrange(1, 24)))
        assert tok.encode(text, False, False) == llm.tokenize(text.encode(), False, False), \
            ascii(text)


# Code points assigned in Unicode 16 / 17 (a letter, an emoji, a digit, a mark, a Cyrillic
# letter, a symbol): the `regex` module knows them, llama.cpp's Unicode 15.1 table does not.
NEW_UNICODE = ["\U00013460", "\U0001FAE9", "\U00010D40", "\U0001E5EE", "\u1C89", "\u2427",
               "\U00013460\U00013461", "\uA7CB"]


@pytest.mark.parametrize("pre", PRE_FAMILIES)
def test_characters_newer_than_llama_cpps_unicode_split_as_unassigned(tmp_path, pre):
    """llama.cpp's pre-tokenizers give a character its table has no category for none,
    however new the `regex` module is: "a\U00013460" is two words to it, not one."""
    import random

    pool = SPLIT_POOL + NEW_UNICODE
    v = pair_vocab("".join(pool))
    path = write_vocab_model(tmp_path / f"{pre}.gguf", "bpe", pre, add_bos=False, bpe=v)
    tok, llm = _tok(path), _llama(path)
    rng = random.Random(pre + "new")
    texts = ["a\U00013460b", "x\U0001FAE9!", "1\U00010D40 2", "\u1C89Ж", "日\U00013460本"]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 16))) for _ in range(150)]
    for text in texts:
        assert tok.encode(text, False, False) == llm.tokenize(text.encode(), False, False), \
            ascii(text)


@pytest.mark.parametrize("pre", ["deepseek-llm", "deepseek-coder"])
def test_deepseek_ranges_leave_out_unicode_whitespace(pair_files, pre):
    """llama.cpp matches DeepSeek's explicit ranges (fullwidth punctuation from U+3000,
    CJK from U+0800) on text whose non-ASCII whitespace became U+000B, so U+3000, U+2000,
    U+205F, … never join the characters around them."""
    tok, llm = _tok(pair_files[pre]), _llama(pair_files[pre])
    for text in ("    \u3000", "a  \u3000 b", "→\u3000→", "×\u2000\u202f어", '"\u0301\u205f|',
                 "日\u3000本", "。\u3000。", "①\u2028②"):
        assert tok.encode(text, False, False) == llm.tokenize(text.encode(), False, False), \
            ascii(text)


@pytest.mark.parametrize("pre", ["glm4", "glm5", "chatglm-bpe"])
def test_glm_pre_tokenizers_match_llama_cpp(tmp_path, pre):
    """Real GLM-4.5 / 4.6 files (glm4moe) name their pre-tokenizer "glm4": llama.cpp splits
    it as llama-3 does and takes a whole word that is a token as that token without
    merging (ignore_merges), which "chatglm-bpe" does not. The vocab holds words the
    merges cannot reach."""
    path = write_vocab_model(tmp_path / f"{pre}.gguf", "bpe", pre, add_bos=None,
                             extra_tokens=[("Ġzzqqxx", 1), ("worldly", 1)])
    tok, llm = _tok(path), _llama(path)
    word = tok.token_to_id["Ġzzqqxx"]
    for text in (" zzqqxx", "hello zzqqxx worldly", MIXED):
        for add_special in (True, False):
            want = llm.tokenize(text.encode(), add_special, False)
            assert tok.encode(text, add_special, False) == want, (pre, ascii(text))
    assert (word in tok.encode(" zzqqxx", False, False)) == (pre != "chatglm-bpe")
    assert not tok.add_bos


def test_gpt_oss_and_deepseek_v3_pre_tokenizers_load(tmp_path):
    """Real gpt-oss files name the o200k pre-tokenizer "gpt-4o" and DeepSeek-V3 / R1 files
    "deepseek-v3": both architectures are supported, so are their tokenizers."""
    for pre in ("gpt-4o", "deepseek-v3"):  # their splits: test_pre_tokenizer_splits_…
        path = write_vocab_model(tmp_path / f"{pre}.gguf", "bpe", pre, add_bos=None)
        tok, llm = _tok(path), _llama(path)
        assert tok.pre == pre and not tok.add_bos
        assert tok.encode(MIXED) == llm.tokenize(MIXED.encode(), True, False)
        assert tok.decode(tok.encode(MIXED)) == MIXED


@pytest.mark.parametrize("pre", ["llama4", "minimax-m2"])
def test_o200k_named_pre_tokenizers_match_llama_cpp(tmp_path, pre):
    """Llama 4 files name their pre-tokenizer "llama4" and MiniMax-M2 files "minimax-m2",
    both of which llama.cpp splits as o200k (gpt-4o): the same random mixes as
    test_pre_tokenizer_splits_match_llama_cpp, and no default BOS."""
    import random

    v = pair_vocab("".join(SPLIT_POOL))
    path = write_vocab_model(tmp_path / f"{pre}.gguf", "bpe", pre, add_bos=None, bpe=v)
    tok, llm = _tok(path), _llama(path)
    assert tok.pre == pre and not tok.add_bos
    rng = random.Random(pre)
    for _ in range(250):
        text = "".join(rng.choice(SPLIT_POOL) for _ in range(rng.randrange(1, 24)))
        assert tok.encode(text, True, False) == llm.tokenize(text.encode(), True, False), \
            ascii(text)


# Han, CJK and Southeast Asian scripts around the edges of the ranges llama.cpp's Kimi K2
# and AFMoE splitters use (unicode_cpt_is_han; AFMoE's class, which the compiled llama.cpp
# has from U+8C48 and with Thai from U+0E40), code points of the Han ranges llama.cpp has no
# category for (U+2B73A, U+FA6E, …), Han that is not a letter (U+3007 is a number, U+2E80
# a symbol), digits of every kind next to letters, and contractions.
CJK_POOL = SPLIT_POOL + (
    list("〇々〆㐀䶿鿿龥豈﫿豇豈ꀀ가힣힯ힰᄀᇿ⺀⼀⿟⿠ｱ､･ﾟﾠ㈱")
    + list("กเ฿๏๿຀ກ໿ༀក៿᝿က႟ꩠꩿꧠ꧿١٣５")
    + ["\U00020000", "\U0002a6df", "\U0002a6e0", "\U0002a700", "\U0002b739", "\U0002b73a",
       "\U0002ebe0", "\U0002ebe1", "\U0002ebf0", "\U0002f800", "\U0002fa1d", "\U0002fa1e",
       "\ufa6e", "\ufada", "\ufdd0", "\ufdd1", "\U000323af", "\U00013460"]
    + ["don't", "I'M", "we'LL", "они'Ve", "x'd", "'t", "日本'S", "1234567", "12", "999",
       "Hello世界", "中文English混合", "ภาษาไทย", "한국어", "東京タワー", "e\u0301", "\r\n\n"])
# tokenizer.ggml.pre names of MoE files llama.cpp splits its own way: Kimi K2 / K2.5 and
# Kimi-Linear, Arcee's AFM MoE, JoyAI-LLM-Flash (as DeepSeek-V3), Kanana-2 (as o200k)
CJK_PRES = ("kimi-k2", "afmoe", "joyai-llm", "kanana2")


@pytest.fixture(scope="module")
def cjk_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cjk")
    v = pair_vocab("".join(CJK_POOL))
    return {pre: write_vocab_model(d / f"{pre}.gguf", "bpe", pre, add_bos=None, bpe=v)
            for pre in CJK_PRES}


@pytest.mark.parametrize("pre", CJK_PRES)
def test_moe_pre_tokenizers_match_llama_cpp(cjk_files, pre):
    """Kimi K2's splitter (a Han run is a word of its own; a word is any run of other
    letters, case aside, after an optional lead, with its contraction; digits in threes),
    AFMoE's (the text before a run of digits goes with the run's first len % 3 digits,
    then threes; then its CJK class; then DeepSeek-V3's words) and the names read as an
    older family, on a vocab whose ids show each word boundary."""
    import random

    tok, llm = _tok(cjk_files[pre]), _llama(cjk_files[pre])
    assert tok.pre == pre and not tok.add_bos
    texts = ["!\U0002ebe1a", "a\U0002b73a日", "\ufa6e\ufada本x", " \U0002ebe1\U0002ebe1 ",
             "x\ufdd01234567", "\xb2    \u3007", "\x1f\u0661", "ab12345cd6", "日本語abc'sDEF",
             "中文English混合 I'M 123456", "  \n\n  テスト\u3000한국어  ", "ก12ภาษา\u0e3f"]
    rng = random.Random(pre)
    texts += ["".join(rng.choice(CJK_POOL) for _ in range(rng.randrange(1, 24)))
              for _ in range(300)]
    for text in texts:
        add = len(text) % 2 == 0
        assert tok.encode(text, add, False) == llm.tokenize(text.encode(), add, False), \
            ascii(text)


def test_kimi_k2_vocab_without_merges_matches_llama_cpp(tmp_path):
    """llama.cpp loads a "kimi-k2" vocab without tokenizer.ggml.merges (an empty list is
    not written) and merges nothing; it refuses any other BPE vocab without them."""
    from gguf_tools.vocab import BPEVocab

    v = pair_vocab("ab 日")
    bare = BPEVocab(tokens=v.tokens, token_types=v.token_types, merges=[], bos_id=v.bos_id,
                    eos_id=v.eos_id, pad_id=v.pad_id)
    path = write_vocab_model(tmp_path / "k.gguf", "bpe", "kimi-k2", add_bos=False, bpe=bare)
    meta = GGUFFile(path).metadata
    assert "tokenizer.ggml.merges" not in meta
    tok, llm = _tok(path), _llama(path)
    for text in ("ab 日", "don't 中文 123", MIXED):
        assert tok.encode(text, False) == llm.tokenize(text.encode(), False, False), ascii(text)
    assert len(tok.encode("ab 日", False)) == 6  # no merges: a token per byte
    for pre in ("gpt-2", "afmoe"):
        with pytest.raises(ModelFormatError, match="tokenizer.ggml.merges"):
            Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": pre})


@pytest.mark.parametrize("name", list(FILES))
def test_decode_round_trips(files, name):
    tok = _tok(files[name])
    for text in (MIXED, " leading", "x", ""):
        assert tok.decode(tok.encode(text, add_special=False)) == text
        assert tok.decode(tok.encode(text), skip_special=True) == text
    if name.startswith("bpe"):
        ids = tok.encode(SPECIAL, add_special=False, parse_special=True)
        assert tok.decode(ids) == SPECIAL
        assert "<|im_end|>" not in tok.decode(ids, skip_special=True)


@pytest.mark.parametrize("name", ["bpe-gpt2", "bpe-qwen2", "spm"])
def test_decode_matches_llama_cpp_detokenize(files, name):
    tok, llm = _tok(files[name]), _llama(files[name])
    for text in (MIXED, SPECIAL):
        ids = tok.encode(text, add_special=True, parse_special=True)
        ref = llm.detokenize(ids, special=False).decode("utf-8", errors="replace")
        assert tok.decode(ids, skip_special=True) == ref
        if name.startswith("bpe"):
            ref = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
            assert tok.decode(ids) == ref


@pytest.mark.parametrize("name", ["spm", "spm-nobos"])
def test_spm_leading_space_matches_llama_cpp(files, name):
    """SentencePiece: the space encode() prefixed is dropped, except after a BOS that is
    rendered as text ("<s> hello", as llama_detokenize and llama-cpp-python give it)."""
    import llama_cpp

    tok, llm = _tok(files[name]), _llama(files[name])
    hello = tok.encode("hello", add_special=False)
    bos, eos = tok.bos_id, tok.eos_id
    buf = ctypes.create_string_buffer(256)

    def detokenize(ids, special):
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, 256, False, special)
        return buf.raw[:n].decode()

    for ids in ([bos, *hello], hello, [eos, *hello], [bos, bos, *hello], [bos], []):
        assert tok.decode(ids) == detokenize(ids, True)
        # hidden specials: after a leading BOS the space goes (llama-cpp-python's and HF's
        # rule; llama_detokenize keeps it), elsewhere as llama_detokenize
        ref = llm.detokenize(ids).decode() if ids[:1] == [bos] else detokenize(ids, False)
        assert tok.decode(ids, skip_special=True) == ref
    assert tok.decode([bos, *hello]) == "<s> hello"
    assert tok.decode([bos, *hello], skip_special=True) == tok.decode(hello) == "hello"


@pytest.mark.parametrize("name", ["spm", "spm-nobos"])
def test_spm_hidden_tokens_after_a_hidden_bos_keep_the_space_to_strip(files, name):
    """After a leading BOS that is not shown, the space goes from the first text, also
    where other hidden tokens (EOS, UNK) come between (llama-cpp-python's detokenize);
    a space token there is the one stripped, not the text after it too."""
    tok, llm = _tok(files[name]), _llama(files[name])
    hello = tok.encode("hello", add_special=False)
    bos, eos, unk = tok.bos_id, tok.eos_id, tok.unk_id
    space = tok.token_to_id["<0x20>"]
    for ids in ([bos, eos, *hello], [bos, unk, eos, *hello], [bos, eos, space, *hello],
                [bos, space, *hello], [bos, eos, bos, *hello]):
        assert tok.decode(ids, skip_special=True) == llm.detokenize(ids).decode(), ids
    assert tok.decode([bos, eos, *hello], skip_special=True) == "hello"


@pytest.mark.parametrize("name", list(FILES))
def test_token_offsets_give_one_offset_per_token(files, name):
    """token_offsets: one offset per id, a hidden BOS included (the server's echoed prompt
    logprobs pair them with the ids: one short failed with a zip() error)."""
    tok = _tok(files[name])
    for text in ("hello world", MIXED):
        ids = tok.encode(text)
        for skip in (True, False):
            offsets = tok.token_offsets(ids, skip)
            assert len(offsets) == len(ids), (skip, ids[:3])
            decoded = tok.decode(ids, skip)
            assert offsets == sorted(offsets) and offsets[-1] <= len(decoded)


def test_spm_bos_without_token_types_is_text():
    """No tokenizer.ggml.token_type: every token is normal, BOS too, so llama.cpp renders
    "<s>" even with special tokens hidden (and keeps the space after it)."""
    s = spm_vocab(512)
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "llama",
                                   "tokenizer.ggml.tokens": list(s.tokens),
                                   "tokenizer.ggml.scores": list(s.scores)})
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id == 1 and not tok.is_special(1)
    assert tok.decode(ids, skip_special=True) == tok.decode(ids) == "<s> hello"


@pytest.mark.parametrize("name", ["bpe-gpt2", "spm"])
def test_stream_decoder_never_splits_a_character(files, name):
    tok = _tok(files[name])
    text = "ok 🤖👍🏽 日本 café"
    ids = tok.encode(text, add_special=True)
    dec = tok.stream_decoder(skip_special=True)
    parts = [dec.push(t) for t in ids] + [dec.flush()]
    # pieces continue a prompt: SPM's space prefix stays (test_stream_keeps_spm_space)
    assert "".join(parts) == (" " + text if name == "spm" else text)
    assert all("\ufffd" not in p for p in parts)
    # byte by byte through byte tokens: nothing comes out until the character is whole
    byte_tok = ({b: tok.token_to_id[f"<0x{b:02X}>"] for b in range(256)} if name == "spm"
                else {b: tok.token_to_id[bytes_to_unicode_char(b)] for b in range(256)})
    dec = tok.stream_decoder()
    for ch in "🤖👍🏽é":
        raw = ch.encode()
        outs = [dec.push(byte_tok[b]) for b in raw]
        assert outs[:-1] == [""] * (len(raw) - 1)
        assert outs[-1] == ch
    assert dec.flush() == ""
    dec = tok.stream_decoder()
    assert dec.push(byte_tok[0xF0]) == "" and dec.flush() == "\ufffd"


@pytest.mark.parametrize("name", ["spm", "spm-nobos", "bpe-gpt2"])
def test_stream_keeps_spm_space(files, name):
    """Generated tokens continue the prompt: the first one keeps its leading space, as
    llama.cpp streams it ("The capital is" + " Paris", not "Paris")."""
    import llama_cpp

    tok, llm = _tok(files[name]), _llama(files[name])
    ids = tok.encode("the capital is the city", add_special=False)
    buf = ctypes.create_string_buffer(256)
    for skip in (True, False):
        for start in range(len(ids)):
            dec = tok.stream_decoder(skip_special=skip)
            got = "".join(dec.push(t) for t in ids[start:]) + dec.flush()
            ref = b""
            for t in ids[start:]:
                n = llama_cpp.llama_token_to_piece(llm._model.vocab, t, buf, 256, 0, not skip)
                ref += buf.raw[:n]
            assert got == ref.decode(), (start, skip)
    the = tok.token_to_id["▁the" if name.startswith("spm") else "Ġthe"]
    assert tok.stream_decoder().push(the) == " the"


def bytes_to_unicode_char(b: int) -> str:
    from gguf_tools.vocab import bytes_to_unicode

    return bytes_to_unicode()[b]


def test_piece_and_token_bytes(files):
    tok = _tok(files["bpe-gpt2"])
    t = tok.token_to_id["Ġthe"]
    assert tok.piece(t) == "Ġthe" and tok.token_bytes(t) == b" the"
    spm = _tok(files["spm"])
    t = spm.token_to_id["▁the"]
    assert spm.piece(t) == "▁the" and spm.token_bytes(t) == b" the"
    assert spm.token_bytes(spm.token_to_id["<0x0A>"]) == b"\n"
    with pytest.raises(ValueError):
        tok.token_bytes(tok.n_vocab)


def test_encode_is_fast(files):
    text = training_text()[40_000:48_000]
    for name in ("bpe-gpt2", "bpe-llama3", "spm"):
        tok = _tok(files[name])
        t0 = time.perf_counter()
        ids = tok.encode(text)
        assert len(ids) > 2000
        assert time.perf_counter() - t0 < 0.5, name


def _meta(**over):
    v = bpe_vocab(300)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": list(v.tokens), "tokenizer.ggml.token_type": v.token_types,
            "tokenizer.ggml.merges": list(v.merges), "tokenizer.ggml.bos_token_id": v.bos_id,
            "tokenizer.ggml.eos_token_id": v.eos_id}
    for k, val in over.items():
        key = "tokenizer.ggml." + k
        if val is None:
            meta.pop(key, None)
        else:
            meta[key] = val
    return meta


@pytest.mark.parametrize("over, err, key", [
    ({"model": None}, ModelFormatError, "tokenizer.ggml.model"),
    ({"model": 3}, ModelFormatError, "tokenizer.ggml.model"),
    ({"model": "t5"}, UnsupportedModelError, "'t5'"),
    ({"pre": "no-such-pre"}, UnsupportedModelError, "no-such-pre"),
    ({"tokens": None}, ModelFormatError, "tokenizer.ggml.tokens"),
    ({"tokens": "abc"}, ModelFormatError, "tokenizer.ggml.tokens"),
    ({"tokens": ["a", "a"]}, ModelFormatError, "tokenizer.ggml.tokens"),
    ({"token_type": [1, 2]}, ModelFormatError, "tokenizer.ggml.token_type"),
    ({"token_type": [6] + [1] * 296 + [3] * 3}, ModelFormatError, "tokenizer.ggml.token_type"),
    ({"merges": None}, ModelFormatError, "tokenizer.ggml.merges"),
    ({"merges": [1, 2]}, ModelFormatError, "tokenizer.ggml.merges"),
    ({"scores": ["x"] * 300}, ModelFormatError, "tokenizer.ggml.scores"),
    ({"bos_token_id": "1"}, ModelFormatError, "tokenizer.ggml.bos_token_id"),
    ({"add_bos_token": "yes"}, ModelFormatError, "tokenizer.ggml.add_bos_token"),
    ({"add_bos_token": True, "pre": "glm4", "bos_token_id": None}, ModelFormatError,
     "tokenizer.ggml.bos_token_id"),
])
def test_bad_metadata_is_refused_with_the_key(over, err, key):
    with pytest.raises(err, match=key.replace(".", r"\.").replace("'", "'")):
        Tokenizer.from_metadata(_meta(**over))


@pytest.mark.parametrize("name", ["bpe-gpt2", "spm"])
def test_lone_surrogate_is_named(files, name):
    """str can hold a lone surrogate (json.loads('"\\ud800"') makes one); UTF-8 cannot."""
    tok = _tok(files[name])
    # an ArgumentError: an EfedgeError (what the CLI and apps catch) and a ValueError
    with pytest.raises(ArgumentError, match=r"lone surrogate '\\udc00' at index 7"):
        tok.encode("hello, \udc00 world")


def test_valid_minimal_metadata():
    tok = Tokenizer.from_metadata(_meta(pre=None, bos_token_id=None, eos_token_id=None))
    assert tok.pre == "default" and not tok.add_bos
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_vocab_fixtures_are_deterministic_and_sized():
    import gguf

    b = bpe_vocab(512)
    assert len(b.tokens) == 512 and len(set(b.tokens)) == 512
    assert b.tokens[-3:] == list(BPE_CONTROL)
    s = spm_vocab(512)
    assert len(s.tokens) == 512 and len(set(s.tokens)) == 512
    assert s.tokens[:3] == ["<unk>", "<s>", "</s>"] and s.tokens[3] == "<0x00>"
    assert bpe_vocab.__wrapped__(512) == b  # same result when trained again
    w = gguf.GGUFWriter(None, "llama")
    assert add_vocab(w, "bpe", 400) == 400
    with pytest.raises(ValueError):
        add_vocab(gguf.GGUFWriter(None, "llama"), "wordpiece")
