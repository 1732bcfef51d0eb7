"""Embed efedge: load, stream a chat reply, read the counters. Usage: embed_minimal.py [MODEL]"""
import sys

import efedge

with efedge.load(sys.argv[1] if len(sys.argv) > 1 else None) as m:  # None: the demo model
    for piece in m.chat([{"role": "user", "content": "Hello! Who are you?"}], stream=True,
                        max_tokens=64):
        print(piece, end="", flush=True)
    s = m.stats()
    print(f"\n{s['tokens_generated']} tokens in {s['wall_s']:.2f} s, expert hits "
          f"{s['hits']}/{s['expert_requests']}, stall {s['stall_s'] * 1e3:.1f} ms")
