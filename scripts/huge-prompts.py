#!/usr/bin/env python3
"""Eight concurrent HTTP chats of 7 MB of prompt text each, against a running
embodyd, with the daemon's RSS and peak RSS (VmHWM) before and after: what
huge prompts cost before they are refused (docs/RELIABILITY.md).

usage: scripts/huge-prompts.py HOST PORT PID
"""
import json, socket, sys, threading, time
host, port, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def mem(field):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(field): return int(l.split()[1]) // 1024
body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "messages": [{"role": "user", "content": "robot " * (7_000_000 // 6)}], "max_tokens": 4}).encode()
res = []
def one():
    s = socket.create_connection((host, port)); s.settimeout(120)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    out = b""
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
    res.append(out.split(b"\r\n")[0].decode())
print("before: rss", mem("VmRSS:"), "MiB, peak", mem("VmHWM:"), "MiB")
t0 = time.time()
ts = [threading.Thread(target=one) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"8 x {len(body)/1e6:.1f} MB prompts in {time.time()-t0:.1f} s:", sorted(set(res)))
print("after: rss", mem("VmRSS:"), "MiB, peak", mem("VmHWM:"), "MiB")
