"""Write a trained ``MoELM`` and its ``tokenizers`` BPE as a qwen3moe GGUF file; quantize and
check it with llama.cpp (llama-cpp-python).

Tensor layout: a torch ``Linear`` weight [out, in] is written as is (ggml reads it as
(in, out)); experts are stacked as numpy (E, F, D) for gate/up and (E, D, F) for down, i.e.
ggml (D, F, E) and (F, D, E). Vectors (norms) stay F32 as llama.cpp requires; matrices are
F16 or F32.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from gguf_tools.corpus import EOT, IM_END, IM_START, SPECIAL_TOKENS
from gguf_tools.train_model import MoELM

ARCH = "qwen3moe"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3
_PROBS_NODE = re.compile(r"ffn_moe_probs-(\d+)")  # llama.cpp's router softmax, per layer


def add_tokenizer(w: gguf.GGUFWriter, tok) -> None:
    """Byte-level BPE from the ``tokenizers`` library as llama.cpp's ``gpt2`` model with the
    ``gpt-2`` pre-tokenizer (the same regex as ``pre_tokenizers.ByteLevel``)."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("ignore_merges"):
        raise ValueError("BPE with ignore_merges=True does not tokenize like llama.cpp")
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    if any(t == "" for t in tokens):
        raise ValueError("token ids are not contiguous")
    types = [TOKEN_CONTROL if t in SPECIAL_TOKENS else TOKEN_NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # Documents are separated by <|endoftext|> (also the "bos" a sequence starts from);
    # chat turns end with <|im_end|>, which is what generation stops on.
    w.add_bos_token_id(vocab[EOT])
    w.add_eos_token_id(vocab[IM_END])
    w.add_eot_token_id(vocab[IM_END])
    w.add_pad_token_id(vocab[EOT])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    assert IM_START in vocab


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy().astype(dtype))


def model_tensors(model: MoELM, ftype: str = "f16") -> dict[str, np.ndarray]:
    """GGUF tensor name → numpy array (numpy shape = reversed ggml shape)."""
    a = model.a
    mat = np.float16 if ftype == "f16" else np.float32
    out = {"token_embd.weight": _np(model.token_embd.weight, mat)}
    for i, b in enumerate(model.blk):
        p = f"blk.{i}."
        gu = b.ffn_gate_up_exps.detach()
        out.update({
            p + "attn_norm.weight": _np(b.attn_norm, np.float32),
            p + "attn_q.weight": _np(b.attn_q.weight, mat),
            p + "attn_k.weight": _np(b.attn_k.weight, mat),
            p + "attn_v.weight": _np(b.attn_v.weight, mat),
            p + "attn_output.weight": _np(b.attn_output.weight, mat),
            p + "attn_q_norm.weight": _np(b.attn_q_norm, np.float32),
            p + "attn_k_norm.weight": _np(b.attn_k_norm, np.float32),
            p + "ffn_norm.weight": _np(b.ffn_norm, np.float32),
            # The router stays F32: near-ties decide routing, keep them as trained.
            p + "ffn_gate_inp.weight": _np(b.ffn_gate_inp.weight, np.float32),
            p + "ffn_gate_exps.weight": _np(gu[:, :a.n_ff_exp], mat),   # (E, F, D)
            p + "ffn_up_exps.weight": _np(gu[:, a.n_ff_exp:], mat),     # (E, F, D)
            p + "ffn_down_exps.weight": _np(b.ffn_down_exps, mat),      # (E, D, F)
        })
    out["output_norm.weight"] = _np(model.output_norm, np.float32)
    out["output.weight"] = _np(model.output.weight, mat)
    return out


def write_gguf(path: str | Path, model: MoELM, tok, *, ftype: str = "f16",
               name: str = "efedge-demo-moe", extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` + ``tok`` to ``path`` (``ftype`` "f16" or "f32")."""
    a = model.a
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16"
                    else gguf.LlamaFileType.ALL_F32)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    w.add_block_count(a.n_layer)
    w.add_context_length(a.n_ctx)
    w.add_embedding_length(a.n_embd)
    w.add_feed_forward_length(a.n_ff_exp)  # no dense FFN; llama.cpp reads the expert width
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_freq_base(a.rope_base)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_expert_count(a.n_expert)
    w.add_expert_used_count(a.n_expert_used)
    w.add_expert_feed_forward_length(a.n_ff_exp)
    add_tokenizer(w, tok)
    for tname, arr in model_tensors(model, ftype).items():
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(src: str | Path, dst: str | Path, ftype: str = "Q8_0") -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``), as users make their files."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} → {ftype}) failed: {rc}")
    return Path(dst)


def llama_forward(path: str | Path, ids: list[int], *, routing: bool = False,
                  n_threads: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """llama.cpp's logits [T, V] for every position of ``ids`` (one fresh sequence) and,
    with ``routing``, each MoE layer's router probabilities [T, E] as llama.cpp computed
    them (read through the graph's eval callback from the ``ffn_moe_probs-{layer}`` nodes)."""
    import llama_cpp as lc
    from llama_cpp._ggml import libggml
    from llama_cpp._utils import suppress_stdout_stderr

    get_name = libggml.ggml_get_name
    get_name.argtypes, get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    nbytes = libggml.ggml_nbytes
    nbytes.argtypes, nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    tget = libggml.ggml_backend_tensor_get
    tget.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    tget.restype = None
    probs: dict[int, list[np.ndarray]] = {}

    def observe(t, ask, _user):
        m = _PROBS_NODE.fullmatch(get_name(t).decode())
        if m is None:
            return not ask  # never cancel the graph (returning False when observing does)
        if not ask:
            buf = np.empty(nbytes(t) // 4, dtype=np.float32)
            tget(t, buf.ctypes.data, 0, buf.nbytes)
            probs.setdefault(int(m.group(1)), []).append(buf)
        return True

    cb = lc.ggml_backend_sched_eval_callback(observe)
    n = len(ids)
    with suppress_stdout_stderr(disable=False):
        lc.llama_backend_init()
        model = lc.llama_model_load_from_file(str(path).encode(),
                                              lc.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = max(256, n)
        cp.n_batch = cp.n_ubatch = n
        cp.n_threads = cp.n_threads_batch = n_threads
        if routing:
            cp.cb_eval = cb
        ctx = lc.llama_init_from_model(model, cp)
    batch = lc.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        with suppress_stdout_stderr(disable=False):
            rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed: {rc}")
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n * n_vocab,))
        logits = logits.reshape(n, n_vocab).copy()
    finally:
        with suppress_stdout_stderr(disable=False):
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
            lc.llama_model_free(model)
    layers = [np.concatenate(probs[k]).reshape(n, -1) for k in sorted(probs)]
    if routing and not layers:
        raise RuntimeError("could not read llama.cpp's router probabilities")
    return logits, layers


def llama_logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one fresh sequence)."""
    return llama_forward(path, ids)[0]


@torch.no_grad()
def torch_logits(model: MoELM, ids: list[int], force=None):
    """(logits [T, V], per layer router probabilities [T, E], per layer experts [T, K]);
    ``force`` replays given experts."""
    model.eval()
    logits, routing, _ = model(torch.tensor([ids]), force=force)
    return (logits[0].float().numpy(), [p.numpy() for p, _ in routing],
            [idx for _, idx in routing])


def compare_with_llama(path: str | Path, model: MoELM, snippets: list[list[int]]) -> dict:
    """Torch vs llama.cpp on each snippet (a fresh sequence each).

    Two comparisons, because with 64 experts the 8th and 9th router probabilities are
    often within 1e-6 of each other and the last bit of any rounding decides between them:

    * same routing (the arithmetic check): torch replays the experts llama.cpp chose (read
      from its graph) — max |Δ| / std(logits) over all positions, and the largest router
      probability difference;
    * free routing (what users see): argmax agreement, the share of (token, layer) whose
      expert set is identical, and the |Δ| / std distribution."""
    K = model.a.n_expert_used
    same, free, agree, routed, pdiff = [], [], [], [], 0.0
    for ids in snippets:
        got, lprobs = llama_forward(path, ids, routing=True)
        force = [torch.from_numpy(p).topk(K, dim=-1).indices for p in lprobs]
        ref_same, probs_same, _ = torch_logits(model, ids, force=force)
        ref_free, _, ours = torch_logits(model, ids)
        same.append(np.abs(ref_same - got).max(-1) / ref_same.std())
        free.append(np.abs(ref_free - got).max(-1) / ref_free.std())
        agree.append(ref_free.argmax(-1) == got.argmax(-1))
        for f, o, p, q in zip(force, ours, probs_same, lprobs, strict=True):
            routed.append((f.sort(-1).values == o.sort(-1).values).all(-1).numpy())
            pdiff = max(pdiff, float(np.abs(p - q).max()))
    s, f = np.concatenate(same), np.concatenate(free)
    return {
        "n_tokens": int(s.size),
        "same_routing_max_rel": float(s.max()),
        "router_prob_max_abs_diff": pdiff,
        "routing_identical": float(np.concatenate(routed).mean()),
        "argmax_agree": float(np.concatenate(agree).mean()),
        "free_max_rel": float(f.max()),
        "free_p99_rel": float(np.percentile(f, 99)),
        "free_median_rel": float(np.median(f)),
    }


def llama_tokenize(path: str | Path, text: str, special: bool = False) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    finally:
        llm.close()
