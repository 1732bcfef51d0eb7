"""Paired A/B of two efedge source trees: one warm worker process per tree, taking turns
round by round (who goes first alternates), so that both see the same moments of a
shared machine. Used by ab_decode.py and policies.py --ab.

A worker is a command run with PYTHONPATH and cwd = its tree; it prints "ready" once
warm, then answers each "go" line with one result line, and exits on any other line.
"""

from __future__ import annotations

import os
import subprocess
import sys


def take_turns(old: str, new: str, worker_args: list[str], rounds: int, parse,
               quiet: bool = False) -> dict[str, list]:
    """{"old": [...], "new": [...]}: parse(result line) of each round, per tree.
    worker_args: what follows the Python executable (the script and its arguments);
    quiet: the workers' stderr is dropped."""
    procs = {}
    for name, root in (("old", old), ("new", new)):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        p = subprocess.Popen([sys.executable, *worker_args], cwd=root, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL if quiet else None, text=True)
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name}: the worker did not start (PYTHONPATH={root})")
        procs[name] = p
    res: dict[str, list] = {"old": [], "new": []}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            p = procs[name]
            p.stdin.write("go\n")
            p.stdin.flush()
            res[name].append(parse(p.stdout.readline()))
    for p in procs.values():
        p.stdin.write("stop\n")
        p.stdin.flush()
        p.wait()
    return res
