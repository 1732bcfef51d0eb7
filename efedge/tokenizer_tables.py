"""Vocabulary tables of llama.cpp's tokenizer (src/llama-vocab.cpp), as data: the BPE
pre-tokenizer regexes named by tokenizer.ggml.pre, and the token texts it treats as end
of generation."""

from __future__ import annotations

# --- BPE pre-tokenizers (names → regex lists exactly as llama.cpp applies them) -----------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# Ling (bailingmoe): single digits, and one newline after optional whitespace (llama.cpp's
# greedy form of the tokenizer.json regex, which has possessive quantifiers)
_BAILING = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
# o200k (gpt-4o, gpt-oss). llama.cpp's regex engine has no \p{Lu}/\p{Ll}: it reads "upper
# then lower" as "letters but a-z, then letters but A-Z", so non-ASCII letters have no case.
_GPT4O_WORD = r"[^\r\n\p{L}\p{N}]?(?:(?=\p{L})[^a-z])%s(?:(?=\p{L})[^A-Z])%s" + _CONTRACTIONS + "?"
_GPT4O = (_GPT4O_WORD % ("*", "+") + "|" + _GPT4O_WORD % ("+", "*")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Cased-letter ranges of DeepSeek's tokenizer.json, written as escapes so that no editor
# or Unicode normalisation can change a code point.
# llama.cpp matches regexes without \p{..} on text whose non-ASCII whitespace has been
# replaced by U+000B, so U+3000, U+2000-U+200A, U+205F, … never match the explicit ranges
# below that contain them: "--\s" (regex's V1 set difference) takes them out.
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    r"\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    r"\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-"
    r"\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15"
    r"\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    r"\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    r"\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d"
    r"\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183"
    r"\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    r"\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
    r"\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    r"\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"(?V1)\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]--\s]+",
    r"\s+\Z",  # llama.cpp's "\s+$": end of the fragment only
    r"(?V1)[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]--\s]+",
    r"\p{N}+",
)
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "bailingmoe": (_BAILING,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_LLM[4], r"\p{N}"),
    "gpt-4o": (_GPT4O,),
    "deepseek-v3": (r"\p{N}{1,3}", r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"[!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
# tokenizer.ggml.pre → (regex family, ignore_merges, add_bos default)
_PRE_NAMES: dict[str, tuple[str, bool, bool]] = {"default": ("default", False, False)}
for _names, _fam, _ign, _bos in (
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "olmo mpt jais trillion granite-docling exaone4 jina-v1-en jina-v2-code roberta-bpe",
     "gpt2", False, False),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     "llama3", True, True),
    ("dbrx smaug-bpe chatglm-bpe", "llama3", False, False),
    # GLM-4.5 / 4.6 files (glm4moe): llama.cpp's CHATGLM4 regex (llama-3's) with
    # ignore_merges, and no BOS
    ("glm4 glm5", "llama3", True, False),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
     "qwen2", False, False),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
     "starcoder", False, False),
    ("falcon", "falcon", False, False),
    ("deepseek-llm", "deepseek-llm", False, False),
    ("deepseek-coder", "deepseek-coder", False, False),
    ("gpt-4o", "gpt-4o", False, False),
    ("deepseek-v3", "deepseek-v3", False, False),
    ("bailingmoe bailingmoe2 llada-moe", "bailingmoe", False, False),
    # Llama 4 files (llama4): llama.cpp reads "llama4" as its GPT4O type; MiniMax-M2 files
    # (minimax-m2) have a pre type of their own that llama.cpp splits with GPT4O's regex
    ("llama4 minimax-m2", "gpt-4o", False, False),
):
    for _n in _names.split():
        _PRE_NAMES[_n] = (_fam, _ign, _bos)

# Token texts llama.cpp treats as end-of-generation (and forces to control type).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOG_TEXTS = frozenset(_EOT_TEXTS + (
    "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "</s>", "<|eom_id|>", "[EOS]",
    "<eos>", "<turn|>", "<|tool_response>", "[e~["))
# the fill-in-the-middle markers llama.cpp finds by their text when the file names none
# (tokenizer.ggml.fim_{pre,suf,mid}_token_id; older files: prefix / suffix / middle_token_id)
_FIM_TEXTS = (("pre", ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>",
                       "<PRE>", "▁<PRE>", "<|code_prefix|>")),
              ("suf", ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>",
                       "<SUF>", "▁<SUF>", "<|code_suffix|>")),
              ("mid", ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>",
                       "<MID>", "▁<MID>", "<|code_middle|>")))
_FIM_EOG_TEXTS = (("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>",
                                                      "<PAD>", "[PAD]")),
                  ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>",
                                                      "<fim-repo>", "<REPO>", "<reponame>")),
                  ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)))
