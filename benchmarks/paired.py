"""Paired A/B of two efedge source trees: one warm worker process per tree, taking turns
round by round (who goes first alternates), so that both see the same moments of a
shared machine. Used by ab_decode.py and policies.py --ab.

A pair of processes does not start even: in A/A runs (one tree against a copy of
itself, 25% cache, the drive read, 128 tokens) the process started second took 3–5%
less compute-thread CPU per token than the other in each of four fresh pairs of one run
(two other runs, of four and two pairs, showed no such pattern: every pair within ±4%),
and one earlier single pair read 8–11% for the tree started second. Over one pair that
reads as a difference between the trees (an earlier session saw "NEW decodes 7–10%
more" in both orders), so the rounds are spread over `pairs` fresh pairs of processes,
which tree starts first alternating.

A worker is a command run with PYTHONPATH and cwd = its tree; it prints "ready" once
warm, then answers each "go" line with one result line, and exits on any other line.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _start(name: str, root: str, worker_args: list[str], quiet: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    p = subprocess.Popen([sys.executable, *worker_args], cwd=root, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL if quiet else None, text=True)
    if p.stdout.readline().strip() != "ready":
        raise SystemExit(f"{name}: the worker did not start (PYTHONPATH={root})")
    return p


def _stop(procs: dict) -> None:
    for p in procs.values():
        p.stdin.write("stop\n")
        p.stdin.flush()
        p.wait()


def take_turns(old: str, new: str, worker_args: list[str], rounds: int, parse,
               quiet: bool = False, pairs: int = 1) -> dict[str, list]:
    """{"old": [...], "new": [...]}: parse(result line) of each round, per tree.
    worker_args: what follows the Python executable (the script and its arguments);
    quiet: the workers' stderr is dropped; pairs: how many pairs of processes share the
    rounds (each pair runs rounds // pairs of them, the first pairs one more where they
    do not divide)."""
    roots = {"old": old, "new": new}
    pairs = max(1, min(int(pairs), rounds))
    res: dict[str, list] = {"old": [], "new": []}
    r = 0
    for k in range(pairs):
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        procs = {name: _start(name, roots[name], worker_args, quiet) for name in order}
        try:
            for _ in range(rounds // pairs + (1 if k < rounds % pairs else 0)):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    p = procs[name]
                    p.stdin.write("go\n")
                    p.stdin.flush()
                    res[name].append(parse(p.stdout.readline()))
                r += 1
        finally:
            _stop(procs)
    return res
