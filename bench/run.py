#!/usr/bin/env python3
"""Control Tower Lite side by side with Caucus (caucus-mcp) and with our own previous code, in one run,
alternating, medians of rounds.

    python3 bench/run.py [--rounds 3] [--quick]

Creates a throwaway virtual environment for Caucus under bench/.venv-caucus on first use, and extracts the
previous code (BASELINE, the last release before this round of work) with `git archive` so it runs beside the
current one. Prints one table and writes it, with the machine and the date, to bench/RESULTS.md. Rate
limits are raised for the run on all sides; everything else runs with its defaults, including our fsync
on every commit (Caucus keeps its state in memory).
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
BASELINE = "1626e2179df55519ecf2ab26ba67255b7ead0979"    # the last release before this round of work
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


def cpu_seconds(pid: int) -> tuple:
    """(user, system) CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def process_counts(pid: int) -> dict:
    """perf-stat-like counters of a process from /proc: CPU seconds, read/write system calls, context switches."""
    user, system = cpu_seconds(pid)
    counts = {"user": user, "system": system}
    with open(f"/proc/{pid}/io") as handle:
        io = dict(line.split(": ") for line in handle.read().splitlines())
    counts["io_syscalls"] = int(io["syscr"]) + int(io["syscw"])
    with open(f"/proc/{pid}/status") as handle:
        status = dict(line.split(":\t") for line in handle.read().splitlines() if ":\t" in line)
    counts["switches"] = int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
    return counts


class Ours:
    name = "Control Tower Lite"
    kind = "ours"
    code = ROOT
    requests_per_delivery = 2        # send; read that acknowledges the previous batch (the ack cursor)

    def __init__(self, env=None):
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix="ctl-bench-")
        os.chmod(self.state, 0o700)
        self.env = {**os.environ, "CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state,
                    "CTL_RATE_LIMIT": "1000000", "CTL_JOIN_RATE": "100000", "CTL_ROOM_RATE": "100000",
                    **(env or {})}
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(self.code, "broker.py")], env=self.env,
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

    def join_body(self, name: str, room: str) -> dict:
        return {"name": name, "room": room}

    def peer(self, name: str, room: str = "bench") -> dict:
        """A joined peer; each measure uses a room of its own, so no room reaches its cap of live peers."""
        secret = ctl_common.read_secret(self.state, ctl_common.JOIN_SECRET_FILE)
        status, data = Http(self.port).call("POST", "/join", self.join_body(name, room), token=secret)
        assert status == 200, data
        return {"kind": self.kind, "port": self.port, "name": name, "token": data["token"]}

    def mcp_command(self):
        """The server as the plugin's .mcp.json starts it."""
        with open(os.path.join(self.code, ".mcp.json")) as handle:
            server = json.load(handle)["mcpServers"]["ctl"]
        command = [server["command"]] + [a.replace("${CLAUDE_PLUGIN_ROOT}", self.code) for a in server["args"]]
        return command, {"CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state}


class Previous(Ours):
    """Our code as it was before this round of work (BASELINE), which speaks the same HTTP API: rooms, group
    commit, the ack cursor, and an fsync on every commit."""
    name = "previous Control Tower Lite"

    def __init__(self):
        super().__init__()
        self.code = tempfile.mkdtemp(prefix="ctl-baseline-")
        archive = subprocess.run(["git", "-C", ROOT, "archive", BASELINE], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", self.code], input=archive, check=True)

    def cleanup(self):
        super().cleanup()
        shutil.rmtree(self.code, ignore_errors=True)


class Reference:
    """One of bench/reference.py's two measuring sticks, spoken to as our own API by the same client."""
    kind = "ours"
    requests_per_delivery = 2
    NAMES = {"answer": "a server that only answers (the client's own ceiling)",
             "durable": "the least a durable broker does (one fsync per send, none for the ack)"}

    def __init__(self, mode: str):
        self.mode, self.name, self.port = mode, self.NAMES[mode], free_port()
        self.folder = tempfile.mkdtemp(prefix="ctl-reference-")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "reference.py"), self.mode, str(self.port),
                                      self.folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/health")
        return self

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def peer(self, name: str, room: str = "") -> dict:
        return {"kind": self.kind, "port": self.port, "name": name, "token": name}


class Caucus:
    name = "Caucus"
    requests_per_delivery = 2        # send; receive that acknowledges the previous batch (ack_seq)

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

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.stop()

    def peer(self, name: str, room: str = "") -> dict:
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
        """Wait for messages and acknowledge them: ours by the ack cursor on the next read, Caucus by its
        ack_seq on the next poll (the same idea as our cursor)."""
        if self.peer["kind"] == "ours":
            ack = f"&ack={self.seq}" if self.seq is not None else ""
            status, data = self.http.call("GET", f"/inbox?wait={wait}&limit=100{ack}", token=self.peer["token"])
            if data["messages"]:
                self.seq = data["messages"][-1]["delivery_id"]
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


def round_trips(system, pairs: int, duration: float) -> dict:
    """Round trips per second for `pairs` sender/reader pairs at full speed, and per request the broker's
    CPU µs, of which in the kernel, its read/write system calls and its context switches."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    room = f"rt-{time.time_ns()}"
    peers = [(system.peer(f"s{pairs}-{i}-{time.time_ns()}", room), system.peer(f"r{pairs}-{i}-{time.time_ns()}", room))
             for i in range(pairs)]
    start_at = time.time() + 0.5
    procs = [context.Process(target=_pair_loop, args=(s, r, duration, start_at, results)) for s, r in peers]
    for proc in procs:
        proc.start()
    while time.time() < start_at:
        time.sleep(0.001)
    before = process_counts(system.proc.pid)
    total = sum(results.get() for _ in procs)
    after = process_counts(system.proc.pid)
    for proc in procs:
        proc.join()
    per_request = {k: (after[k] - before[k]) / max(1, total * system.requests_per_delivery) for k in after}
    return {"rate": total / duration, "cpu": (per_request["user"] + per_request["system"]) * 1e6,
            "kernel": per_request["system"] * 1e6, "io_syscalls": per_request["io_syscalls"],
            "switches": per_request["switches"]}


def delivery_latency(system, samples: int, pairs: int = 1) -> list:
    """Milliseconds from a send to the recipient's waiting read returning it, with `pairs` pairs at once."""
    found, threads = [], [threading.Thread(target=lambda: found.extend(_latency_pair(system, samples)))
                          for _ in range(pairs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(found)


def _latency_pair(system, samples: int) -> list:
    room = f"lat-{time.time_ns()}"
    sender, receiver = system.peer(f"ls-{time.time_ns()}", room), system.peer(f"lr-{time.time_ns()}", room)
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


def operator_room(ours) -> tuple:
    """The operator token and the bench room's id (the room every bench peer joins)."""
    operator = ctl_common.read_secret(ours.state, ctl_common.OPERATOR_TOKEN_FILE)
    rooms = Http(ours.port).call("GET", "/rooms", token=operator)[1]["rooms"]
    return operator, next(r["id"] for r in rooms if r["name"] == "bench")


def claim_race(ours, tasks: int = 200, claimers: int = 20) -> dict:
    peers = [ours.peer(f"claimer-{i}-{time.time_ns()}") for i in range(claimers)]
    operator, room = operator_room(ours)
    admin = Http(ours.port)
    ids = [admin.call("POST", "/tasks", {"title": f"race {i}", "room": room}, token=operator)[1]["id"]
           for i in range(tasks)]
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


# ---------------------------------------------------------------- scale


MIX = (("send", 30), ("check", 30), ("heartbeat", 20), ("lock", 10), ("claim", 10))   # per 100 operations


def _mixed_peers(port: int, peers: list, room_size: int, duration: float, start_at: float, results) -> None:
    """One process driving a few peers in turn; each operation timed on its own."""
    import random
    rng = random.Random(peers[0]["name"])
    clients = [(p, Http(port), {"seq": None, "claimed": None, "locked": None}) for p in peers]
    weights = [w for _, w in MIX]
    timings = {op: [] for op, _ in MIX}
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.time() + duration
    while time.time() < deadline:
        peer, http, memo = rng.choice(clients)
        op = rng.choices([o for o, _ in MIX], weights)[0]
        token = peer["token"]
        started = time.perf_counter()
        if op == "send":
            http.call("POST", "/messages", {"to": f"mix-{rng.randrange(room_size)}", "content": "status: on it"},
                      token=token)
        elif op == "check":
            ack = f"&ack={memo['seq']}" if memo["seq"] else ""
            _, data = http.call("GET", f"/inbox?limit=50{ack}", token=token)
            if data.get("messages"):
                memo["seq"] = data["messages"][-1]["delivery_id"]
        elif op == "heartbeat":
            http.call("POST", "/heartbeat", {}, token=token)
        elif op == "lock":
            if memo["locked"]:
                http.call("POST", "/locks/release", {"path": memo["locked"]}, token=token)
                memo["locked"] = None
            else:
                memo["locked"] = f"{peer['name']}.py"
                http.call("POST", "/locks", {"path": memo["locked"]}, token=token)
        else:
            if memo["claimed"]:
                http.call("POST", "/tasks/complete", {"task_id": memo["claimed"], "summary": "done"}, token=token)
                memo["claimed"] = None
            else:
                status, data = http.call("POST", "/tasks/claim", {}, token=token)
                memo["claimed"] = data["id"] if status == 200 else None
        timings[op].append((time.perf_counter() - started) * 1000)
    results.put(timings)


def mixed_workload(peers: int, duration: float, processes: int = 8) -> dict:
    """100 peers of one room sending, checking, heartbeating, locking and claiming at realistic ratios."""
    ours = Ours(env={"CTL_JOIN_RATE": "100000"}).start()
    try:
        joined = [ours.peer(f"mix-{i}") for i in range(peers)]
        operator, room = operator_room(ours)
        admin = Http(ours.port)
        for i in range(peers * 20):
            admin.call("POST", "/tasks", {"title": f"mixed {i}", "room": room}, token=operator)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        start_at = time.time() + 0.5
        groups = [joined[i::processes] for i in range(processes)]
        procs = [context.Process(target=_mixed_peers, args=(ours.port, g, peers, duration, start_at, results))
                 for g in groups]
        for proc in procs:
            proc.start()
        merged = {op: [] for op, _ in MIX}
        for _ in procs:
            for op, values in results.get().items():
                merged[op].extend(values)
        for proc in procs:
            proc.join()
        total = sum(len(v) for v in merged.values())
        return {"ops_per_s": total / duration, "rss_kib": rss_kib(ours.proc.pid),
                "ops": {op: (percentile(sorted(v), 0.5), percentile(sorted(v), 0.99), len(v))
                        for op, v in merged.items() if v}}
    finally:
        ours.cleanup()


def big_room(tasks: int, messages: int) -> Ours:
    """A broker whose bench room holds `tasks` tasks (90% done) and `messages` messages (1% unread)."""
    ours = Ours(env={"CTL_RETENTION": str(max(100_000, messages * 2))}).start()
    reader = ours.peer("reader")
    ours.peer("sink")
    ours.stop()
    db = sqlite3.connect(os.path.join(ours.state, "broker.db"))
    room, sink_id = db.execute("SELECT room_id, id FROM peers WHERE name='sink'").fetchone()
    now = time.time()
    db.execute("BEGIN")
    db.executemany("INSERT INTO tasks(room_id, id, title, description, status, created_by, created_at, done_by, "
                   "done_at, summary, files) VALUES(?, ?, ?, '', ?, 'bench', ?, ?, ?, ?, '[]')",
                   [(room, i, f"task {i}", "done" if i % 10 else "ready", now, "sink" if i % 10 else None,
                     now if i % 10 else None, "did it" if i % 10 else None) for i in range(1, tasks + 1)])
    for start in range(0, messages, 100_000):
        rows = range(start, min(messages, start + 100_000))
        db.executemany("INSERT INTO messages(id, room_id, sender, sender_role, origin, recipient, category, content, "
                       "created_at) VALUES(?, ?, 'sink', 'worker', 'agent', 'sink', 'info', 'stored message body', ?)",
                       [(i + 1, room, now) for i in rows])
        db.executemany("INSERT INTO deliveries(peer_id, message_id, acked_at) VALUES(?, ?, ?)",
                       [(sink_id, i + 1, None if i % 100 == 0 else now) for i in rows])
    db.commit()
    db.close()
    ours.start()
    ours.reader = reader
    return ours


def scale_costs(tasks: int, messages: int, rounds: int = 3, per_run: int = 700) -> dict:
    """Per request of list_tasks, an empty inbox read and the dashboard's /state poll, in an empty room and in
    a room holding `tasks` tasks and `messages` messages: the median time the client waits, and the broker's
    CPU from /proc. Both brokers run at once and take turns; each turn is long enough for /proc's clock."""
    empty, full = big_room(0, 0), big_room(tasks, messages)
    try:
        probes = []
        for ours in (empty, full):
            operator, room = operator_room(ours)
            http = Http(ours.port)
            first = http.call("GET", f"/state?room={room}", token=operator)[1]
            poll = (f"/state?room={room}&since={first['version']}&after_message={first['messages'][0]['id'] if first['messages'] else 0}"
                    f"&after_event={first['events'][0]['id'] if first['events'] else 0}")
            probes.append({"list_tasks": (http, "/tasks", ours.reader["token"]),
                           "inbox read": (http, "/inbox?limit=20", ours.reader["token"]),
                           "dashboard /state poll": (http, poll, operator)})
            for http, path, token in probes[-1].values():
                for _ in range(100):
                    assert http.call("GET", path, token=token)[0] == 200
        waits = [{name: [] for name in probes[0]} for _ in probes]
        cpu = [dict.fromkeys(probes[0], 0.0) for _ in probes]
        for turn in range(rounds):
            for name in probes[0]:
                for index in ((0, 1) if turn % 2 == 0 else (1, 0)):
                    http, path, token = probes[index][name]
                    pid = (empty, full)[index].proc.pid
                    before = sum(cpu_seconds(pid))
                    for _ in range(per_run):
                        started = time.perf_counter()
                        status, _ = http.call("GET", path, token=token)
                        waits[index][name].append((time.perf_counter() - started) * 1e6)
                        assert status == 200
                    cpu[index][name] += sum(cpu_seconds(pid)) - before
        return {name: [(statistics.median(waits[i][name]), cpu[i][name] * 1e6 / (rounds * per_run)) for i in (0, 1)]
                for name in probes[0]} | {"rss_kib": rss_kib(full.proc.pid)}
    finally:
        empty.cleanup()
        full.cleanup()


def plugin_hook_command(event: str) -> str:
    """The plugin's command for one hook event, as hooks/hooks.json gives it to Claude Code's shell."""
    with open(os.path.join(ROOT, "hooks", "hooks.json")) as handle:
        groups = json.load(handle)["hooks"][event]
    return groups[0]["hooks"][0]["command"].replace("${CLAUDE_PLUGIN_ROOT}", ROOT)


def hook_latency(ours, runs: int) -> dict:
    """The hook processes, started the way Claude Code starts them (the plugin's command through /bin/sh, a
    child of the session's agent process), alternating with a bare `python3 -S -c pass` started the same way:
    median and p99 ms for an edit's PreToolUse inside the project (a lock taken), one outside it (no broker
    call), a Bash call's two hooks (its command parsed for writes, the room's locked files noted before and
    compared after), and bare Python."""
    import socket
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from agent_shim import read_line
    project = tempfile.mkdtemp(prefix="bench-hook-")
    os.makedirs(os.path.join(project, ".git"))
    shim_socket = os.path.join(tempfile.mkdtemp(), "agent.sock")
    env = {**os.environ, "CTL_PORT": str(ours.port), "CTL_STATE_DIR": ours.state, "CTL_NAME": "hooked"}
    agent = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "agent_shim.py"), shim_socket,
                              sys.executable, os.path.join(ROOT, "mcp_server.py")], env=env, cwd=project,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    agent.stdin.write((json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}}}) + "\n"
        + json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n").encode())
    agent.stdin.flush()
    agent.stdout.readline()
    bindings, deadline = os.path.join(ours.state, "sessions"), time.time() + 10
    while time.time() < deadline and not (os.path.isdir(bindings) and os.listdir(bindings)):
        time.sleep(0.05)            # the server binds itself to its agent (it joins at the first hook)

    def run(command: str, stdin: str) -> float:
        request = {"argv": ["/bin/sh", "-c", command], "cwd": project, "stdin": stdin, "env": {}}
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(shim_socket)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = read_line(sock)
        assert json.loads(reply)["code"] == 0, reply
        return (time.perf_counter() - started) * 1000

    hook, after = plugin_hook_command("PreToolUse"), plugin_hook_command("PostToolUse")
    bare = "python3 -S -c pass"
    timings = {"inside the project": [], "outside the project": [],
               "a Bash call, PreToolUse and PostToolUse together": [], "bare python3 -S -c pass": []}
    try:
        run(hook, json.dumps({"tool_name": "Edit", "cwd": project, "hook_event_name": "PreToolUse",
                              "tool_input": {"file_path": os.path.join(project, "warm.py")}}))    # joins
        for i in range(runs):
            for label, folder in (("inside the project", project), ("outside the project", tempfile.gettempdir())):
                event = {"tool_name": "Edit", "cwd": project, "hook_event_name": "PreToolUse",
                         "tool_input": {"file_path": os.path.join(folder, f"f{i}.py")}}
                timings[label].append(run(hook, json.dumps(event)))
            shell = {"tool_name": "Bash", "cwd": project, "tool_use_id": f"toolu_{i}",
                     "tool_input": {"command": f"sed -i 's/a/b/' notes{i}.txt && cat notes{i}.txt | grep b"}}
            timings["a Bash call, PreToolUse and PostToolUse together"].append(
                run(hook, json.dumps({**shell, "hook_event_name": "PreToolUse"}))
                + run(after, json.dumps({**shell, "hook_event_name": "PostToolUse", "tool_response": {}})))
            timings["bare python3 -S -c pass"].append(run(bare, ""))
    finally:
        agent.kill()
        agent.wait()
    return {label: (statistics.median(t), percentile(sorted(t), 0.99)) for label, t in timings.items()}


def filter_cost() -> dict:
    """Median µs per KiB of the content filter over the benign corpus (each message timed on its own, the
    median of five runs), and the worst adversarial 8 KiB input."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import corpus
    from test_filter import ADVERSARIAL, outcome
    per_kib = statistics.median(statistics.median(_time(outcome, text) for _ in range(5)) * 1e6
                                / (len(text.encode()) / 1024) for text in corpus.BENIGN)
    worst = max((statistics.median(_time(outcome, make(8192)) for _ in range(5)), shape)
                for shape, make in ADVERSARIAL.items())
    return {"per_kib_us": per_kib, "worst_8k_ms": worst[0] * 1000, "worst_shape": worst[1]}


def _time(function, argument) -> float:
    started = time.perf_counter()
    function(argument)
    return time.perf_counter() - started


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


def bare_start(runs: int) -> float:
    """Median ms to spawn and reap `python3 -S -c pass`: the floor every Python process pays."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["python3", "-S", "-c", "pass"], check=True)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def mcp_session(ours, name: str, push: bool):
    """A joined mcp_server.py session, spoken to over stdio."""
    env = {**os.environ, "CTL_PORT": str(ours.port), "CTL_STATE_DIR": ours.state, "CTL_NAME": name,
           "CTL_CHANNEL": "1" if push else "0", "CTL_ROOM": "bench"}
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
            watcher = subprocess.Popen([sys.executable, os.path.join(ROOT, "mcp_server.py"), "watch", "bench/watched"],
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
    receiver = system.peer(f"mem-r-{time.time_ns()}", "memory")
    senders = [system.peer(f"mem-s{i}-{time.time_ns()}", "memory") for i in range(8)]
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
    # A user's Python writes bytecode caches; a machine that forbids it would time recompiling every module.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for trying the bench out")
    args = parser.parse_args()
    duration = 1.5 if args.quick else 3.0
    samples = 60 if args.quick else 200
    flood = 10_000 if args.quick else 100_000
    big = 100_000 if args.quick else 1_000_000
    big_tasks = 10_000 if args.quick else 100_000
    ours, previous = Ours(), Previous()
    caucus = Caucus() if Caucus.available() else None
    systems = [ours, previous] + ([caucus] if caucus else [])
    references = [Reference("answer"), Reference("durable")]
    rows = []

    def row(measure, unit, ours_value, caucus_value, better, against="Caucus"):
        ratio = ""
        if isinstance(caucus_value, (int, float)) and caucus_value:
            factor = ours_value / caucus_value if better == "higher" else caucus_value / ours_value
            ratio = f"{factor:.2f}× {'better' if factor > 1 else 'behind'}" + ("" if against == "Caucus" else
                                                                                 f" ({against})")
        fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v  # noqa: E731
        rows.append((measure, unit, fmt(ours_value), fmt(caucus_value), ratio))
        print(f"{measure}: ours {fmt(ours_value)} {unit}, Caucus {fmt(caucus_value)} {ratio}", flush=True)

    try:
        for system in systems + references:        # inside the try: one that fails to start leaves none running
            system.start()
        cpu = {}
        for pairs in (1, 8):
            measured = systems + (references if pairs == 1 else [])
            got = alternate(args.rounds, measured, lambda s: round_trips(s, pairs, duration))
            rates = {name: statistics.median(run["rate"] for run in runs) for name, runs in got.items()}
            cpu[pairs] = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
                          for name, runs in got.items()}
            label = f"{pairs} pair{'s' if pairs > 1 else ''}"
            row(f"send + read round trips, {label}", "per s", rates[ours.name],
                rates[caucus.name] if caucus else "n/a", "higher")
            row(f"  previous code, {label}", "per s", rates[previous.name], rates[caucus.name] if caucus else "n/a",
                "higher")
            for reference in (references if pairs == 1 else []):
                row(f"  {reference.name}, {label}", "per s", rates[reference.name],
                    rates[caucus.name] if caucus else "n/a", "higher")
        for pairs in (1, 8):
            label = f"{pairs} pair{'s' if pairs > 1 else ''}"
            mine, old = cpu[pairs][ours.name], cpu[pairs][previous.name]
            row(f"broker CPU per request, {label}", "µs", mine["cpu"], old["cpu"], "lower", "previous code")
            row(f"  of which in the kernel (fsync, sockets), {label}", "µs", mine["kernel"], old["kernel"], "lower",
                "previous code")
            row(f"  per delivered message ({ours.requests_per_delivery} requests; previous code "
                f"{previous.requests_per_delivery}), {label}", "µs", mine["cpu"] * ours.requests_per_delivery,
                old["cpu"] * previous.requests_per_delivery, "lower", "previous code")
            row(f"  read/write system calls per request, {label}", "", round(mine["io_syscalls"], 1),
                round(old["io_syscalls"], 1), "lower", "previous code")
            row(f"  context switches per request, {label}", "", round(mine["switches"], 2),
                round(old["switches"], 2), "lower", "previous code")
        for pairs in (1, 8):
            got = alternate(args.rounds, systems, lambda s: delivery_latency(s, samples // pairs, pairs))
            merged = {name: sorted(v for run in runs for v in run) for name, runs in got.items()}
            for label, fraction in (("p50", 0.5), ("p99", 0.99)):
                row(f"send → waiting read returns, {pairs} pair{'s' if pairs > 1 else ''}, {label}", "ms",
                    percentile(merged[ours.name], fraction),
                    percentile(merged[caucus.name], fraction) if caucus else "n/a", "lower")
        pushed = push_latency(ours, samples)
        row("send → MCP channel push written, p50 / p99", "ms",
            f"{percentile(pushed, 0.5):.1f} / {percentile(pushed, 0.99):.1f}", "not measured", "")
        woke = watcher_latency(ours, 10 if args.quick else 20)
        row("send → watcher prints and exits, median", "ms", statistics.median(woke), "not measured", "")
        race = claim_race(ours)
        row("claim race, 20 claimers × 200 tasks", "claims/s", race["requests_per_s"], "n/a (no tasks)", "higher")
        row("claim race: exactly one winner per task", "", "yes" if race["exactly_one"] else "NO", "n/a", "")
        got = alternate(args.rounds, systems, lambda s: cold_start(s, 7))
        bare = statistics.median(bare_start(7) for _ in range(args.rounds))
        started = statistics.median(t for t, _ in got[ours.name])
        row("MCP cold start (spawn → initialize + tools/list)", "ms", started,
            statistics.median(t for t, _ in got[caucus.name]) if caucus else "n/a", "lower")
        row("  against bare python3 -S -c pass", "ms", f"{started:.1f} vs {bare:.1f} ({started / bare:.2f}×)", "", "")
        row("  previous code", "ms", statistics.median(t for t, _ in got[previous.name]), started, "lower", "ours")
        row("tools/list result size", "bytes", got[ours.name][0][1], got[caucus.name][0][1] if caucus else "n/a", "lower")
        hooks = hook_latency(ours, 20 if args.quick else 60)
        bare_median = hooks["bare python3 -S -c pass"][0]
        for label, (median, p99) in hooks.items():
            times = "" if label.startswith("bare") else f" ({median / bare_median:.2f}× bare Python)"
            row(f"hook process through /bin/sh, {label}, median / p99", "ms",
                f"{median:.1f} / {p99:.1f}{times}", "n/a (no hooks)", "")
        mem = {s.name: memory(s, flood) for s in systems if s is not previous}
        row("broker RSS, idle", "KiB", mem[ours.name][0], mem[caucus.name][0] if caucus else "n/a", "lower")
        row(f"broker RSS after {flood:,} messages", "KiB", mem[ours.name][1], mem[caucus.name][1] if caucus else "n/a",
            "lower")
    finally:
        for system in systems + references:
            system.cleanup()
    mixed = mixed_workload(100, 8 if args.quick else 30)
    row(f"mixed workload, 100 peers, {'8' if args.quick else '30'} s: operations", "per s", mixed["ops_per_s"], "n/a", "")
    for op, (p50, p99, count) in mixed["ops"].items():
        row(f"  {op} ({count:,} done), p50 / p99", "ms", f"{p50:.1f} / {p99:.1f}", "n/a", "")
    row("  broker RSS after the mixed workload", "KiB", mixed["rss_kib"], "n/a", "")
    scale = scale_costs(big_tasks, big)
    for name in ("list_tasks", "inbox read", "dashboard /state poll"):
        (empty_wait, empty_cpu), (full_wait, full_cpu) = scale[name]
        row(f"{name}: empty room vs {big_tasks:,} tasks + {big:,} messages", "µs",
            f"client waits {empty_wait:,.0f} vs {full_wait:,.0f} (×{full_wait / empty_wait:.2f}); broker CPU "
            f"{empty_cpu:,.0f} vs {full_cpu:,.0f} (×{full_cpu / empty_cpu:.2f})", "n/a", "")
    row(f"broker RSS with {big_tasks:,} tasks + {big:,} messages", "KiB", scale["rss_kib"], "n/a", "")
    filtered = filter_cost()
    row("content filter, benign corpus, median per message", "µs per KiB", filtered["per_kib_us"], "n/a", "")
    row(f"content filter, worst adversarial 8 KiB ({filtered['worst_shape']})", "ms", filtered["worst_8k_ms"], "n/a", "")
    table = ["| Measure | Unit | Control Tower Lite | Caucus (or as named) | Ratio |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(map(str, r))} |" for r in rows]
    report = (f"# Benchmark results\n\nMeasured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
              f"`python3 bench/run.py{' --quick' if args.quick else ''}`, {args.rounds} rounds alternating the "
              f"systems; medians. Caucus is caucus-mcp from PyPI in a throwaway virtual environment, its hub and "
              f"caucus-bridge. The previous code is commit {BASELINE[:10]}, extracted with git archive and run "
              f"beside the current one. Rate limits raised for the run everywhere. Control Tower Lite fsyncs every "
              f"commit holding a change a client is told is stored (WAL, synchronous=FULL; acks and heartbeats "
              f"alone are not fsynced, see SECURITY.md); Caucus keeps state in memory. CPU per request is the broker "
              f"process's user+system time from /proc over the run, divided by the requests it answered.\n\n"
              + "\n".join(table) + "\n")
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
