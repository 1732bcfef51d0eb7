"""Making a conversation or a prompt fit the context, as chat front ends do: the oldest
turns dropped (never the leading system prompt or the newest message), or a prompt's
middle cut out. `efedge chat` fits its history so; the server's Ollama routes fit a
request so, as Ollama itself does (its chat drops the oldest messages, its runner keeps a
prompt's first `num_keep` tokens and its end), where the OpenAI routes answer 400
`context_length_exceeded` as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Ollama's default `num_keep`: a cut prompt keeps its first tokens (the BOS, the template's
# opening) and its end
OLLAMA_NUM_KEEP = 4


def reply_room(n_ctx: int, max_tokens: int | None) -> int:
    """Tokens to keep free for the reply when deciding what fits: the reply's own limit
    where it has one, else a quarter of the context; at most half of it, at least one."""
    want = max_tokens if max_tokens is not None and max_tokens > 0 else n_ctx // 4
    return max(1, min(want, n_ctx // 2))


def leading_system(messages: Sequence[dict]) -> int:
    """How many messages at the start are system prompts (kept whatever is dropped)."""
    n = 0
    while n < len(messages) and messages[n].get("role") in ("system", "developer"):
        n += 1
    return n


def fit_turns(render: Callable[[list[dict]], list[int]], messages: Sequence[dict],
              n_ctx: int, room: int) -> tuple[list[dict], list[int], int] | None:
    """The conversation with its oldest turns dropped — a turn: a user message and every
    reply after it — until its prompt plus `room` fits in `n_ctx`, keeping the leading
    system messages and the newest message: (messages kept, their prompt's ids, turns
    dropped). None where even the system prompt with the newest message fills the
    context. `render`: messages → prompt token ids (the model's chat template)."""
    msgs = list(messages)
    first = min(leading_system(msgs), len(msgs) - 1)
    if len(render(msgs[:first] + msgs[-1:])) >= n_ctx:
        return None
    dropped = 0
    while True:
        ids = render(msgs)
        if len(ids) + room <= n_ctx or len(msgs) - first <= 1:
            return msgs, ids, dropped
        del msgs[first]
        while len(msgs) - first > 1 and msgs[first].get("role") != "user":
            del msgs[first]
        dropped += 1


def cut_middle(ids: Sequence[int], limit: int, keep: int = OLLAMA_NUM_KEEP) -> list[int]:
    """`ids` cut to `limit` tokens: its first `keep` and its last `limit - keep`, as
    Ollama's runner cuts a prompt longer than its context."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    keep = max(0, min(keep, limit - 1))
    return ids[:keep] + ids[len(ids) - (limit - keep):]
