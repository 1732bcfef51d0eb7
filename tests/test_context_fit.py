"""efedge.context_fit: which turns a conversation keeps to fit the context, and how a
prompt is cut, against a renderer whose lengths are known (one token per character of
content, two per message of template)."""

from __future__ import annotations

from efedge.context_fit import cut_middle, fit_turns, leading_system, reply_room


def render(msgs):
    return [0] * sum(2 + len(m["content"] or "") for m in msgs)


def turn(role, n):
    return {"role": role, "content": "x" * n}


def test_reply_room():
    assert reply_room(512, None) == 128 and reply_room(512, -1) == 128
    assert reply_room(512, 50) == 50 and reply_room(512, 400) == 256  # at most half
    assert reply_room(3, None) == 1  # at least one


def test_a_conversation_that_fits_is_kept_whole():
    msgs = [turn("system", 10), turn("user", 10), turn("assistant", 10), turn("user", 10)]
    kept, ids, dropped = fit_turns(render, msgs, 100, 20)
    assert kept == msgs and len(ids) == 48 and dropped == 0


def test_the_oldest_turns_go_first_and_a_turn_goes_whole():
    sys_, u1, a1, t1, u2, a2, u3 = (turn("system", 8), turn("user", 20), turn("assistant", 20),
                                    turn("tool", 5), turn("user", 20), turn("assistant", 20),
                                    turn("user", 20))
    msgs = [sys_, u1, a1, t1, u2, a2, u3]  # 10 + 22 + 22 + 7 + 22 + 22 + 22 = 127 tokens
    # room 30 in 120: 127 + 30 > 120; without the first turn (u1, a1, t1: 51) 76 + 30 fits
    kept, ids, dropped = fit_turns(render, msgs, 120, 30)
    assert kept == [sys_, u2, a2, u3] and len(ids) == 76 and dropped == 1
    # room 60: the second turn goes too; the system prompt and the newest message stay
    kept, ids, dropped = fit_turns(render, msgs, 120, 60)
    assert kept == [sys_, u3] and len(ids) == 32 and dropped == 2
    assert msgs == [sys_, u1, a1, t1, u2, a2, u3]  # (the caller's list is left alone)


def test_the_newest_message_alone_past_the_context_is_none():
    msgs = [turn("system", 8), turn("user", 5), turn("user", 200)]
    assert fit_turns(render, msgs, 100, 10) is None
    # without room to spare it is kept as it is: the reply gets what is left
    kept, ids, _ = fit_turns(render, [turn("user", 90)], 100, 50)
    assert len(ids) == 92


def test_leading_system_counts_developer_too():
    assert leading_system([turn("system", 1), turn("developer", 1), turn("user", 1)]) == 2
    assert leading_system([turn("user", 1), turn("system", 1)]) == 0


def test_cut_middle_keeps_the_first_tokens_and_the_end():
    ids = list(range(100))
    assert cut_middle(ids, 10) == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]
    assert cut_middle(ids, 10, keep=0) == list(range(90, 100))
    assert cut_middle(ids, 200) == ids
    assert cut_middle(ids, 3, keep=4) == [0, 1, 99]  # keep is clipped so the end stays
