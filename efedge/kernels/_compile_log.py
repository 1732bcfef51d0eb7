"""Telling people that numba is compiling: the first run takes minutes instead of a
second, once per install and CPU, and should not look like a hang."""

from __future__ import annotations

import logging

import numba

COMPILE_MESSAGE = ("efedge: compiling kernels for this CPU, once (the first run takes 1-3 "
                   "minutes; later runs start in about a second)")


class FirstCompile(numba.core.event.Listener):
    """Calls ``report()`` when numba starts its first compilation while installed."""

    def __init__(self, report) -> None:
        self.report, self.seen = report, False

    def on_start(self, event) -> None:
        if not self.seen:
            self.seen = True
            self.report()

    def on_end(self, event) -> None:
        pass


def compile_notice(report):
    """A context in which ``report()`` is called once, when numba starts compiling
    anything (in this thread or another): the load then takes minutes instead of a
    second, once per install, and a progress display can say why."""
    return numba.core.event.install_listener("numba:compile", FirstCompile(report))


def announce_compiles(log: logging.Logger):
    """compile_notice that logs COMPILE_MESSAGE at WARNING."""
    return compile_notice(lambda: log.warning(COMPILE_MESSAGE))
