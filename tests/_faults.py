"""Disk errors for the transfer engine's tests: its reads of the model file fail at a
chosen offset, the others read as usual."""

from __future__ import annotations


def fail_reads_at(monkeypatch, engine, offset: int) -> None:
    """Every read the engine makes at `offset` raises EIO (until monkeypatch undoes it, or
    the test sets engine._read back itself)."""
    real_read = engine._read

    def failing(buf, off):
        if off == offset:
            raise OSError(5, "injected EIO")
        real_read(buf, off)

    monkeypatch.setattr(engine, "_read", failing)
