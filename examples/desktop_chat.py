"""A small tkinter chat window on efedge: the pattern a desktop app needs.

    python examples/desktop_chat.py [MODEL.gguf]

* The model loads and generates on a worker thread, so the window never freezes.
* The worker never touches a widget (Tk is not thread-safe): it puts events on a queue,
  and the UI thread drains that queue every few milliseconds with `root.after`.
* Stop calls `Model.cancel()`, which is safe from any thread: the reply ends at the next
  token and what was written so far stays in the conversation.

`ChatSession` holds all of that and knows nothing about Tk, so it runs (and is tested)
without a display; only `main()` creates a window.
"""

from __future__ import annotations

import queue
import sys
import threading

import efedge


class ChatSession:
    """A conversation with a model, replies written on a worker thread.

    Events land on `self.events` as ("piece", text), ("error", message) and, last for
    every reply, ("done", {"text", "cancelled", "stats"}).
    """

    def __init__(self, model: efedge.Model, system: str | None = None, **sampling):
        self.model = model
        self.sampling = {"max_tokens": 256, **sampling}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, text: str) -> None:
        if self.busy:
            raise RuntimeError("a reply is still being written: stop it first")
        self.messages.append({"role": "user", "content": text})
        self._stop.clear()
        self._thread = threading.Thread(target=self._reply, name="chat-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reply in progress (from any thread, e.g. the UI's)."""
        self._stop.set()  # also covers a click before the worker has started generating
        self.model.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def _reply(self) -> None:
        parts: list[str] = []
        before = self.model.stats()
        try:
            for piece in self.model.chat(self.messages, stream=True, **self.sampling):
                if self._stop.is_set():
                    break
                parts.append(piece)
                self.events.put(("piece", piece))
        except efedge.EfedgeError as exc:  # e.g. the conversation outgrew the context
            self.events.put(("error", str(exc)))
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        after = self.model.stats()
        delta = {k: after[k] - before[k] for k in ("tokens_generated", "wall_s", "hits",
                                                    "expert_requests", "stall_s")}
        self.events.put(("done", {"text": text, "cancelled": self._stop.is_set(),
                                  "stats": delta}))


def main(argv: list[str] | None = None) -> int:
    import tkinter as tk
    from tkinter import scrolledtext

    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else None
    root = tk.Tk()
    root.title("efedge chat")
    log = scrolledtext.ScrolledText(root, wrap="word", height=24, width=80, state="disabled")
    log.pack(fill="both", expand=True, padx=6, pady=6)
    bar = tk.Frame(root)
    bar.pack(fill="x", padx=6, pady=(0, 6))
    entry = tk.Entry(bar)
    entry.pack(side="left", fill="x", expand=True)
    send_btn = tk.Button(bar, text="Send", state="disabled")
    stop_btn = tk.Button(bar, text="Stop", state="disabled")
    send_btn.pack(side="left", padx=(6, 0))
    stop_btn.pack(side="left", padx=(6, 0))
    status = tk.Label(root, text="loading…", anchor="w")
    status.pack(fill="x", padx=6, pady=(0, 6))

    loaded: queue.Queue = queue.Queue()  # the loader thread's progress and result
    state: dict = {"session": None}

    def write(text: str) -> None:
        log.configure(state="normal")
        log.insert("end", text)
        log.see("end")
        log.configure(state="disabled")

    def load() -> None:  # worker thread: never touches a widget
        try:
            m = efedge.load(path, progress=lambda f, msg: loaded.put(("progress", f, msg)))
            loaded.put(("ready", m))
        except efedge.EfedgeError as exc:
            loaded.put(("error", str(exc)))

    def poll() -> None:  # UI thread, every 30 ms: apply what the workers reported
        while not loaded.empty():
            ev = loaded.get()
            if ev[0] == "progress":
                status.configure(text=f"loading… {ev[1]:.0%} {ev[2]}")
            elif ev[0] == "ready":
                state["session"] = ChatSession(ev[1], temperature=0.8)
                status.configure(text=f"{ev[1].path.name}: ready")
                send_btn.configure(state="normal")
            else:
                status.configure(text=f"cannot load the model: {ev[1]}")
        session = state["session"]
        while session is not None and not session.events.empty():
            kind, data = session.events.get()
            if kind == "piece":
                write(data)
            elif kind == "error":
                write(f"\n[{data}]")
            else:
                s = data["stats"]
                rate = s["tokens_generated"] / s["wall_s"] if s["wall_s"] else 0.0
                hit = s["hits"] / s["expert_requests"] if s["expert_requests"] else 1.0
                write("\n[stopped]\n\n" if data["cancelled"] else "\n\n")
                status.configure(text=f"{s['tokens_generated']} tokens, {rate:.1f} t/s, "
                                      f"expert hits {hit:.0%}, stall {s['stall_s'] * 1e3:.0f} ms")
                send_btn.configure(state="normal")
                stop_btn.configure(state="disabled")
        root.after(30, poll)

    def send(_event=None) -> None:
        session, text = state["session"], entry.get().strip()
        if session is None or session.busy or not text:
            return
        entry.delete(0, "end")
        write(f"You: {text}\nModel: ")
        send_btn.configure(state="disabled")
        stop_btn.configure(state="normal")
        status.configure(text="writing…")
        session.send(text)

    def stop() -> None:
        if state["session"] is not None:
            state["session"].stop()

    def close() -> None:
        session = state["session"]
        if session is not None:
            session.stop()
            session.wait(5)
            session.model.close()
        root.destroy()

    send_btn.configure(command=send)
    stop_btn.configure(command=stop)
    entry.bind("<Return>", send)
    root.protocol("WM_DELETE_WINDOW", close)
    threading.Thread(target=load, name="loader", daemon=True).start()
    root.after(30, poll)
    entry.focus_set()
    root.mainloop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
