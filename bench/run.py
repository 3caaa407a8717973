#!/usr/bin/env python3
"""Control Tower Lite side by side with Caucus (caucus-mcp), in one run, alternating, medians of rounds.

    python bench/run.py [--rounds 3] [--quick]

Creates a throwaway virtual environment for Caucus under bench/.venv-caucus on first use. Prints one
table and writes it, with the machine and the date, to bench/RESULTS.md. Rate limits are raised for
the run on both sides (ours through CTL_RATE_LIMIT, Caucus through its own set_rate_limit); everything
else runs with its defaults, including our fsync on every write (Caucus keeps its state in memory).
"""
import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from ctl import common as ctl_common  # noqa: E402

CAUCUS_VENV = os.path.join(HERE, ".venv-caucus")
CAUCUS_HUB = """
import sys
import caucus.hub as hub
hub.state.set_rate_limit(refill_rate=1e9, capacity=1e9)
hub._REGISTER_BUCKET_CAPACITY = hub._REGISTER_BUCKET_REFILL = 1e9
sys.argv = ["caucus-hub", "--host", "127.0.0.1", "--port", sys.argv[1], "--no-browser", "--log-level", "WARNING"]
hub.main()
"""


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port: int, path: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing healthy on port {port}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Http:
    """One keep-alive connection speaking JSON."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body=None, token=None):
        headers = {"Host": f"127.0.0.1:{self.port}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")


# ---------------------------------------------------------------- the two systems behind one small interface


class Ours:
    name = "Control Tower Lite"

    def __init__(self, env=None):
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix="ctl-bench-")
        os.chmod(self.state, 0o700)
        self.env = {**os.environ, "CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state,
                    "CTL_RATE_LIMIT": "1000000", **(env or {})}
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "broker.py")], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/health")
        return self

    def stop(self):
        self.proc.terminate()
        self.proc.wait()

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.state, ignore_errors=True)

    def peer(self, name: str) -> dict:
        secret = ctl_common.read_secret(self.state, ctl_common.JOIN_SECRET_FILE)
        status, data = Http(self.port).call("POST", "/join", {"name": name}, token=secret)
        assert status == 200, data
        return {"kind": "ours", "port": self.port, "name": name, "token": data["token"]}

    def mcp_command(self):
        return [sys.executable, os.path.join(ROOT, "mcp_server.py")], {"CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state}


class Caucus:
    name = "Caucus"

    def __init__(self):
        self.port = free_port()
        self.proc = None

    @staticmethod
    def available() -> bool:
        python = os.path.join(CAUCUS_VENV, "bin", "python")
        if not os.path.exists(os.path.join(CAUCUS_VENV, "bin", "caucus-bridge")):
            print("setting up Caucus in a throwaway virtual environment (pip install caucus-mcp)...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", CAUCUS_VENV], check=True)
            result = subprocess.run([python, "-m", "pip", "install", "--quiet", "caucus-mcp"], capture_output=True, text=True)
            if result.returncode != 0:
                print(f"Caucus could not be installed: {result.stderr[-500:]}")
                return False
        return True

    def start(self):
        self.proc = subprocess.Popen([os.path.join(CAUCUS_VENV, "bin", "python"), "-c", CAUCUS_HUB, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/version")
        return self

    def stop(self):
        self.proc.terminate()
        self.proc.wait()

    cleanup = stop

    def peer(self, name: str) -> dict:
        status, data = Http(self.port).call("POST", "/register", {"project": name})
        assert status == 200, data
        return {"kind": "caucus", "port": self.port, "name": name, "token": data["token"]}

    def mcp_command(self):
        return [os.path.join(CAUCUS_VENV, "bin", "caucus-bridge")], {"CAUCUS_HUB_URL": f"http://127.0.0.1:{self.port}"}


class Client:
    """A peer's sending and receiving, in each system's own protocol."""

    def __init__(self, peer: dict):
        self.peer, self.http, self.seq = peer, Http(peer["port"]), None

    def send(self, to: str, content: str) -> None:
        if self.peer["kind"] == "ours":
            status, data = self.http.call("POST", "/messages", {"to": to, "content": content}, token=self.peer["token"])
        else:
            status, data = self.http.call("POST", "/send", {"token": self.peer["token"], "to": to, "content": content})
        assert status == 200, data

    def receive(self, wait: int) -> list:
        """Wait for messages and acknowledge them (ours: explicit ack; Caucus: ack piggybacked on the next poll)."""
        if self.peer["kind"] == "ours":
            status, data = self.http.call("GET", f"/inbox?wait={wait}&limit=100", token=self.peer["token"])
            if data["messages"]:
                self.http.call("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in data["messages"]]},
                               token=self.peer["token"])
            return [m["content"] for m in data["messages"]]
        ack = f"&ack_seq={self.seq}" if self.seq is not None else ""
        status, data = self.http.call("GET", f"/receive?timeout={wait}{ack}", token=self.peer["token"])
        messages = [m for m in data.get("messages", []) if m.get("kind", "message") == "message"]
        if data.get("messages"):
            self.seq = max(m.get("seq", 0) for m in data["messages"])
        return [m["content"] for m in messages]


# ---------------------------------------------------------------- measures


def _pair_loop(sender: dict, receiver: dict, duration: float, start_at: float, results):
    out, inbox = Client(sender), Client(receiver)
    while time.time() < start_at:
        time.sleep(0.001)
    count, deadline = 0, time.time() + duration
    while time.time() < deadline:
        out.send(receiver["name"], f"rt {count}")
        while not inbox.receive(5):
            pass
        count += 1
    results.put(count)


def round_trips(system, pairs: int, duration: float) -> float:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    peers = [(system.peer(f"s{pairs}-{i}-{time.time_ns()}"), system.peer(f"r{pairs}-{i}-{time.time_ns()}"))
             for i in range(pairs)]
    start_at = time.time() + 0.5
    procs = [context.Process(target=_pair_loop, args=(s, r, duration, start_at, results)) for s, r in peers]
    for proc in procs:
        proc.start()
    total = sum(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total / duration


def delivery_latency(system, samples: int) -> list:
    sender, receiver = system.peer(f"ls-{time.time_ns()}"), system.peer(f"lr-{time.time_ns()}")
    out, inbox = Client(sender), Client(receiver)
    arrived, ready = {}, threading.Event()

    def listen():
        for _ in range(samples):
            ready.set()
            got = []
            while not got:
                got = inbox.receive(10)
            arrived[got[0]] = time.perf_counter()

    thread = threading.Thread(target=listen)
    thread.start()
    sent = {}
    for i in range(samples):
        ready.wait()
        ready.clear()
        time.sleep(0.01)            # the reader is parked in its long-poll
        sent[f"lat {i}"] = time.perf_counter()
        out.send(receiver["name"], f"lat {i}")
        while f"lat {i}" not in arrived:
            time.sleep(0.0005)
    thread.join()
    return sorted((arrived[k] - sent[k]) * 1000 for k in sent)


def percentile(values: list, fraction: float) -> float:
    return values[min(len(values) - 1, int(round(fraction * (len(values) - 1))))]


def claim_race(ours, tasks: int = 200, claimers: int = 20) -> dict:
    operator = ctl_common.read_secret(ours.state, ctl_common.OPERATOR_TOKEN_FILE)
    admin = Http(ours.port)
    ids = [admin.call("POST", "/tasks", {"title": f"race {i}"}, token=operator)[1]["id"] for i in range(tasks)]
    peers = [ours.peer(f"claimer-{i}-{time.time_ns()}") for i in range(claimers)]
    wins = {task_id: 0 for task_id in ids}
    lock, barrier = threading.Lock(), threading.Barrier(claimers + 1)

    def claim(peer):
        client = Http(ours.port)
        client.call("GET", "/health")
        barrier.wait()
        for task_id in ids:
            if client.call("POST", "/tasks/claim", {"task_id": task_id}, token=peer["token"])[0] == 200:
                with lock:
                    wins[task_id] += 1

    threads = [threading.Thread(target=claim, args=(p,)) for p in peers]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"requests_per_s": tasks * claimers / elapsed, "exactly_one": all(v == 1 for v in wins.values())}


def stored_broker(stored: int):
    """A broker whose database already holds `stored` messages (10% of them unread by another peer)."""
    ours = Ours(env={"CTL_RETENTION": str(stored * 2)}).start()
    reader, sink = ours.peer("reader"), ours.peer("sink")
    ours.stop()
    db = sqlite3.connect(os.path.join(ours.state, "broker.db"))
    sink_id = db.execute("SELECT id FROM peers WHERE name='sink'").fetchone()[0]
    now = time.time()
    db.execute("BEGIN")
    for start in range(0, stored, 50_000):
        rows = range(start, min(stored, start + 50_000))
        db.executemany("INSERT INTO messages(id, sender, sender_role, origin, recipient, category, content, created_at) "
                       "VALUES(?, 'sink', 'worker', 'agent', 'sink', 'info', 'stored message body', ?)",
                       [(i + 1, now) for i in rows])
        db.executemany("INSERT INTO deliveries(peer_id, message_id, acked) VALUES(?, ?, ?)",
                       [(sink_id, i + 1, int(i % 10 != 0)) for i in rows])
    db.commit()
    db.close()
    return ours.start(), reader


def empty_read_costs(sizes: list, blocks: int = 20, per_block: int = 100) -> list:
    """Median µs of an empty inbox read for each store size; both brokers run at once and take turns,
    so machine noise falls on both alike."""
    brokers = [stored_broker(size) for size in sizes]
    try:
        clients = [(Http(ours.port), reader) for ours, reader in brokers]
        timings = [[] for _ in sizes]
        for _ in range(blocks):
            for index, (client, reader) in enumerate(clients):
                for _ in range(per_block):
                    started = time.perf_counter()
                    status, data = client.call("GET", "/inbox?limit=20", token=reader["token"])
                    timings[index].append((time.perf_counter() - started) * 1e6)
                    assert status == 200 and not data["messages"]
        return [statistics.median(t) for t in timings]
    finally:
        for ours, _ in brokers:
            ours.cleanup()


def cold_start(system, runs: int) -> tuple:
    command, env = system.mcp_command()
    lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}},
             {"jsonrpc": "2.0", "method": "notifications/initialized"}, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]
    timings, size = [], 0
    workdir = tempfile.mkdtemp(prefix="bench-cwd-")
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, **env}, cwd=workdir)
        proc.stdin.write((json.dumps(lines[0]) + "\n").encode())
        proc.stdin.flush()
        proc.stdout.readline()
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in lines[1:]).encode())
        proc.stdin.flush()
        listing = json.loads(proc.stdout.readline())
        timings.append((time.perf_counter() - started) * 1000)
        size = len(json.dumps(listing["result"], separators=(",", ":")))
        proc.kill()
        proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    return statistics.median(timings), size


def mcp_session(ours, name: str, push: bool):
    """A joined mcp_server.py session, spoken to over stdio."""
    env = {**os.environ, "CTL_PORT": str(ours.port), "CTL_STATE_DIR": ours.state, "CTL_NAME": name,
           "CTL_CHANNEL": "1" if push else "0"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "mcp_server.py")], env=env, cwd=tempfile.mkdtemp(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for message in ({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}}},
                    {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "join", "arguments": {}}}):
        proc.stdin.write((json.dumps(message) + "\n").encode())
        proc.stdin.flush()
    while json.loads(proc.stdout.readline()).get("id") != 2:
        pass
    return proc


def push_latency(ours, samples: int) -> list:
    """From a send to the recipient's MCP server writing the channel notification on stdout."""
    session = mcp_session(ours, "pushed", push=True)
    sender = Client(ours.peer(f"push-s-{time.time_ns()}"))
    timings = []
    try:
        for i in range(samples):
            time.sleep(0.01)
            started = time.perf_counter()
            sender.send("pushed", f"push {i}")
            while f"push {i}" not in session.stdout.readline().decode():
                pass
            timings.append((time.perf_counter() - started) * 1000)
    finally:
        session.kill()
        session.wait()
    return sorted(timings)


def watcher_latency(ours, samples: int) -> list:
    """From a send to a waiting `mcp_server.py watch` printing it and exiting (what wakes the agent)."""
    session = mcp_session(ours, "watched", push=False)
    sender = Client(ours.peer(f"watch-s-{time.time_ns()}"))
    env = {**os.environ, "CTL_PORT": str(ours.port), "CTL_STATE_DIR": ours.state}
    timings = []
    try:
        for i in range(samples):
            watcher = subprocess.Popen([sys.executable, os.path.join(ROOT, "mcp_server.py"), "watch", "watched"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            time.sleep(0.4)        # started and waiting on the broker
            started = time.perf_counter()
            sender.send("watched", f"watch {i}")
            out = watcher.stdout.read()
            watcher.wait()
            timings.append((time.perf_counter() - started) * 1000)
            assert f"watch {i}".encode() in out
    finally:
        session.kill()
        session.wait()
    return sorted(timings)


def _flood(peer: dict, to: str, count: int):
    client = Client(peer)
    for i in range(count):
        client.send(to, f"stored message {i}")


def memory(system, messages: int) -> tuple:
    idle = rss_kib(system.proc.pid)
    receiver = system.peer(f"mem-r-{time.time_ns()}")
    senders = [system.peer(f"mem-s{i}-{time.time_ns()}") for i in range(8)]
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_flood, args=(s, receiver["name"], messages // 8)) for s in senders]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return idle, rss_kib(system.proc.pid)


# ---------------------------------------------------------------- the run


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"{platform.system()} {platform.release()}")


def alternate(rounds: int, systems: list, measure) -> dict:
    """Run `measure(system)` for each system, alternating the order every round; keep all results."""
    results = {s.name: [] for s in systems}
    for index in range(rounds):
        for system in (systems if index % 2 == 0 else list(reversed(systems))):
            results[system.name].append(measure(system))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for trying the bench out")
    args = parser.parse_args()
    duration = 1.5 if args.quick else 3.0
    samples = 60 if args.quick else 200
    flood = 10_000 if args.quick else 100_000
    big = 100_000 if args.quick else 1_000_000
    ours = Ours().start()
    caucus = Caucus().start() if Caucus.available() else None
    systems = [ours] + ([caucus] if caucus else [])
    rows = []

    def row(measure, unit, ours_value, caucus_value, better):
        ratio = ""
        if isinstance(caucus_value, (int, float)) and caucus_value:
            factor = ours_value / caucus_value if better == "higher" else caucus_value / ours_value
            ratio = f"{factor:.2f}× " + ("better" if factor > 1 else "(behind)")
        fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v  # noqa: E731
        rows.append((measure, unit, fmt(ours_value), fmt(caucus_value), ratio))
        print(f"{measure}: ours {fmt(ours_value)} {unit}, Caucus {fmt(caucus_value)} {ratio}", flush=True)

    try:
        for pairs in (1, 8):
            got = alternate(args.rounds, systems, lambda s: round_trips(s, pairs, duration))
            row(f"send + read round trips, {pairs} pair{'s' if pairs > 1 else ''}", "per s",
                statistics.median(got[ours.name]), statistics.median(got[caucus.name]) if caucus else "n/a", "higher")
        got = alternate(args.rounds, systems, lambda s: delivery_latency(s, samples))
        merged = {name: sorted(v for run in runs for v in run) for name, runs in got.items()}
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            row(f"send → waiting read returns, {label}", "ms", percentile(merged[ours.name], fraction),
                percentile(merged[caucus.name], fraction) if caucus else "n/a", "lower")
        pushed = push_latency(ours, samples)
        row("send → MCP channel push written, p50 / p99", "ms",
            f"{percentile(pushed, 0.5):.1f} / {percentile(pushed, 0.99):.1f}", "not measured", "")
        woke = watcher_latency(ours, 10 if args.quick else 20)
        row("send → watcher prints and exits, median", "ms", statistics.median(woke), "not measured", "")
        race = claim_race(ours)
        row("claim race, 20 claimers × 200 tasks", "claims/s", race["requests_per_s"], "n/a (no tasks)", "higher")
        row("claim race: exactly one winner per task", "", "yes" if race["exactly_one"] else "NO", "n/a", "")
        small, large = empty_read_costs([10_000, big])
        row("empty inbox read, 10k stored messages", "µs", small, "n/a (in memory)", "lower")
        row(f"empty inbox read, {big:,} stored messages", "µs", large, "n/a (in memory)", "lower")
        row(f"read cost ratio {big // 1000}k / 10k", "", f"{large / small:.2f}", "n/a", "")
        got = alternate(args.rounds, systems, lambda s: cold_start(s, 7))
        row("MCP cold start (spawn → initialize + tools/list)", "ms", statistics.median(t for t, _ in got[ours.name]),
            statistics.median(t for t, _ in got[caucus.name]) if caucus else "n/a", "lower")
        row("tools/list result size", "bytes", got[ours.name][0][1], got[caucus.name][0][1] if caucus else "n/a", "lower")
        mem = {s.name: memory(s, flood) for s in systems}
        row("broker RSS, idle", "KiB", mem[ours.name][0], mem[caucus.name][0] if caucus else "n/a", "lower")
        row(f"broker RSS after {flood:,} messages", "KiB", mem[ours.name][1], mem[caucus.name][1] if caucus else "n/a", "lower")
    finally:
        for system in systems:
            system.cleanup()
    table = ["| Measure | Unit | Control Tower Lite | Caucus | Ratio |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(map(str, r))} |" for r in rows]
    report = (f"# Benchmark results\n\nMeasured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
              f"`python bench/run.py{' --quick' if args.quick else ''}`, {args.rounds} rounds alternating the two "
              f"systems; medians. Caucus is caucus-mcp from PyPI in a throwaway virtual environment, its hub and "
              f"caucus-bridge. Rate limits raised for the run on both sides. Control Tower Lite fsyncs every write "
              f"(WAL, synchronous=FULL); Caucus keeps state in memory.\n\n" + "\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    notes_path = os.path.join(HERE, "NOTES.md")
    if os.path.exists(notes_path):
        with open(notes_path) as handle:
            report += "\n" + handle.read()
    with open(os.path.join(HERE, "RESULTS.md"), "w") as handle:
        handle.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
