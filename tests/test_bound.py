"""The lower bound on loads and stall (efedge/experts/bound.py) against known answers."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from efedge.experts.bound import min_loads, stall_bound


def _one_layer(seq, k=1):
    return np.asarray(seq, dtype=np.int64).reshape(-1, 1, k)


def test_textbook_sequence():
    # the classic reference string: MIN faults 7 times with 3 frames
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    assert min_loads(_one_layer(seq), np.zeros(1, int), np.array([3]), 8).tolist() == [7]
    # warm-up tokens run but are not counted: the first 3 loads fall before the window
    assert min_loads(_one_layer(seq), np.zeros(1, int), np.array([3]), 8,
                     warmup=3).tolist() == [4]


def _brute_force(requests, cap):
    """Fewest loads by trying every eviction choice (tiny inputs only)."""
    @functools.cache
    def best(i, resident):
        if i == len(requests):
            return 0
        need = requests[i]
        missing = [k for k in need if k not in resident]
        if not missing:
            return best(i + 1, resident)
        res = set(resident)
        options = []

        def fill(res, todo):
            if not todo:
                options.append(frozenset(res))
                return
            k = todo[0]
            if len(res) < cap:
                fill(res | {k}, todo[1:])
                return
            for v in sorted(res - set(need)):
                fill((res - {v}) | {k}, todo[1:])

        fill(res, missing)
        return len(missing) + min(best(i + 1, r) for r in options)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_min_is_optimal_on_small_multi_expert_traces(seed):
    rng = np.random.default_rng(seed)
    n_expert, k, T, L = 6, 2, 7, 2
    experts = np.stack([[rng.choice(n_expert, k, replace=False) for _ in range(L)]
                        for _ in range(T)])
    cap = int(rng.integers(k, 6))
    requests = [tuple(sorted(int(e) + l * n_expert for e in experts[t, l]))
                for t in range(T) for l in range(L)]
    got = min_loads(experts, np.zeros(L, int), np.array([cap]), n_expert)
    assert int(got.sum()) == _brute_force(requests, cap)


def test_min_never_loads_more_than_lru_and_classes_are_separate():
    rng = np.random.default_rng(3)
    T, L, E, K, cap = 200, 3, 16, 4, 12
    experts = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)]
                        for _ in range(T)])
    lru, res = 0, []
    for t in range(T):
        for l in range(L):
            keys = [int(e) + l * E for e in experts[t, l]]
            for key in keys:
                if key in res:
                    res.remove(key)
                else:
                    lru += 1
                    if len(res) >= cap:
                        victim = next(v for v in res if v not in keys)
                        res.remove(victim)
                res.append(key)
    got = min_loads(experts, np.zeros(L, int), np.array([cap]), E)
    assert 0 < got.sum() < lru
    # one pool per layer (three classes of cap slots each) cannot need more loads than
    # one shared pool of the same per-layer size … and a class never evicts another's
    split = min_loads(experts, np.arange(L), np.array([cap] * L), E)
    alone = [min_loads(experts[:, [l]], np.zeros(1, int), np.array([cap]), E)[0]
             for l in range(L)]
    assert split.tolist() == alone


def test_too_few_slots_is_an_error():
    with pytest.raises(ValueError, match="slots"):
        min_loads(np.array([[[0, 1, 2]]]), np.zeros(1, int), np.array([2]), 4)


def test_stall_bound_arithmetic():
    # 10 loads of 1 MB at 1 MB/s = 10 s; 2 may precede the window; 3 s of compute hide
    assert stall_bound(np.array([10]), [1e6], 1e6, 0.0, 2, 3.0) == pytest.approx(5.0)
    assert stall_bound(np.array([10]), [1e6], 1e6, 0.0, 2, 30.0) == 0.0
    assert stall_bound(np.array([4, 0]), [1e6, 2e6], 1e6, 0.5, 0, 0.0) == pytest.approx(6.0)
