#!/usr/bin/env python3
"""How long an honest client waits while the broker is attacked: one attack class at a time, for a few
seconds each, while an honest pair of peers sends and reads in a loop. Prints each request's latency
(median, p99, worst) per attack, next to a quiet phase, and writes the table to bench/ATTACK.md.

    python3 bench/attack.py [--seconds 4]

The target (issue 20): no request holds the loop longer than 50 ms, seen as the honest client's worst case.
Rate limits are raised for the attackers so they reach the loop; everything else runs with its defaults.
"""
import argparse
import os
import platform
import socket
import sqlite3
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench.run import Http, Ours  # noqa: E402
from ctl.config import MAX_HEAD_BYTES  # noqa: E402

KIB64 = 64 * 1024
BODIES = (b'[[[[[[["' + b'\\"' * (KIB64 // 2 - 4),                  # escaped quotes, never closed
          b'{"a":' + b"[" * (KIB64 - 6) + b"}",                     # nesting as deep as the body allows
          b'{"a":"' + b"\\\\" * (KIB64 // 2 - 4) + b'"}',            # backslash runs
          b"{" + b",".join(b'"k%d":1' % i for i in range(6000)) + b"}")


def raw_post(port: int, path: str, body: bytes, token: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        while sock.recv(65536):
            pass


# ---------------------------------------------------------------- the attacks: each runs until `stop` is set


def clients(ours, count: int, request, stop) -> None:
    """`count` clients, each on its own connection, making `request(http, n)` over and over until `stop`."""
    def run(n):
        http = Http(ours.port)
        while not stop.is_set():
            request(http, n)
    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def hostile_json(ours, attacker, stop):
    while not stop.is_set():
        for body in BODIES:
            raw_post(ours.port, "/heartbeat", body, attacker["token"])


def dribbled_heads(ours, attacker, stop):
    """Twenty clients each sending a head near the limit a few bytes at a time, over and over."""
    head = (f"GET /peers HTTP/1.1\r\nHost: 127.0.0.1:{ours.port}\r\nAuthorization: Bearer {attacker['token']}\r\n"
            f"X-Pad: {'p' * (MAX_HEAD_BYTES - 300)}\r\n\r\n").encode()
    socks = []
    while not stop.is_set():
        socks = socks or [socket.create_connection(("127.0.0.1", ours.port)) for _ in range(20)]
        for at in range(0, len(head), 8):
            if stop.is_set():
                break
            for sock in socks:
                sock.sendall(head[at:at + 8])
        for sock in socks:
            sock.close()
        socks = []


def lock_list_readers(ours, attacker, stop):
    """One peer holds as many long-path locks as it may; eight clients fetch the room's lock list nonstop."""
    client = Http(ours.port)
    n = 0
    while client.call("POST", "/locks", {"path": f"{n:03d}" + "d" * 1000}, token=attacker["token"])[0] == 200:
        n += 1
    clients(ours, 8, lambda http, _: http.call("GET", "/locks", token=attacker["token"]), stop)


def outside_write_lock(ours, attacker, stop):
    """Another process holds the database's write lock while thirty writers keep trying."""
    db = sqlite3.connect(os.path.join(ours.state, "broker.db"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    clients(ours, 30, lambda http, n: http.call("POST", "/locks", {"path": f"w{n}.py"}, token=attacker["token"]), stop)
    db.execute("ROLLBACK")
    db.close()


def refused_completions(ours, attacker, stop):
    """Completions of tasks that do not exist, each with the longest summary, from four clients."""
    body = {"task_id": 99999, "summary": "s" * 2000 + " ignore previous"}
    clients(ours, 4, lambda http, _: http.call("POST", "/tasks/complete", body, token=attacker["token"]), stop)


def idle_sockets(ours, attacker, stop):
    """Five hundred connections opened and left silent, then half-closed long polls on top."""
    socks = [socket.create_connection(("127.0.0.1", ours.port)) for _ in range(500)]
    polls = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", ours.port))
        sock.sendall(f"GET /inbox?wait=30 HTTP/1.1\r\nHost: 127.0.0.1:{ours.port}\r\n"
                     f"Authorization: Bearer {attacker['token']}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        polls.append(sock)
    stop.wait()
    for sock in socks + polls:
        sock.close()


ATTACKS = {"quiet (no attack)": None,
           "hostile JSON bodies, 64 KiB": hostile_json,
           "20 heads dribbled 8 bytes at a time": dribbled_heads,
           "8 readers of a full lock list": lock_list_readers,
           "outside write lock, 30 writers": outside_write_lock,
           "refused completions, 2,000-char summaries": refused_completions,
           "500 idle sockets + 50 half-closed polls": idle_sockets}


# ---------------------------------------------------------------- the honest pair


def honest_latencies(ours, sender, reader, seconds: float) -> list:
    """A send, then the reader's read, in a loop: each request's wall time, in ms."""
    out, inbox = Http(ours.port), Http(ours.port)
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for client, method, path, body, token in ((out, "POST", "/messages", {"to": reader["name"], "content": "hi"},
                                                   sender["token"]),
                                                  (inbox, "GET", "/inbox?limit=100", None, reader["token"])):
            started = time.perf_counter()
            status, _ = client.call(method, path, body, token=token)
            latencies.append((time.perf_counter() - started) * 1000)
            assert status in (200, 503), status          # 503: the outside write lock, answered at once
        time.sleep(0.005)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    rows = []
    for label, attack in ATTACKS.items():
        ours = Ours(env={"CTL_MAX_CONNECTIONS": "1024"}).start()
        try:
            attacker = ours.peer("attacker", "attacked")
            sender, reader = ours.peer("honest-a", "attacked"), ours.peer("honest-b", "attacked")
            stop = threading.Event()
            thread = threading.Thread(target=attack, args=(ours, attacker, stop)) if attack else None
            if thread:
                thread.start()
                time.sleep(0.5)                              # the attack under way before measuring
            latencies = sorted(honest_latencies(ours, sender, reader, args.seconds))
            stop.set()
            if thread:
                thread.join(60)
        finally:
            ours.cleanup()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        rows.append((label, len(latencies), statistics.median(latencies), p99, latencies[-1]))
        print(f"{label:45} {rows[-1][1]:6d} requests  median {rows[-1][2]:6.1f} ms  p99 {p99:6.1f} ms  "
              f"worst {latencies[-1]:6.1f} ms", flush=True)
    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"
    table = ["| attack | honest requests | median ms | p99 ms | worst ms |", "|---|---:|---:|---:|---:|"]
    table += [f"| {label} | {n} | {med:.1f} | {p99:.1f} | {worst:.1f} |" for label, n, med, p99, worst in rows]
    with open(os.path.join(HERE, "ATTACK.md"), "w") as handle:
        handle.write(f"# An honest client's latency under attack\n\n{time.strftime('%Y-%m-%d')}, {machine}; "
                     f"`python3 bench/attack.py --seconds {args.seconds:g}`, {args.seconds:g} s per attack, "
                     "a fresh broker for each.\nTarget: no request held longer than 50 ms.\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
