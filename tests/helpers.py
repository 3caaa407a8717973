"""Real brokers and real MCP servers as subprocesses on free loopback ports, each with its own state dir."""
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The user's own settings must never reach a test, nor a test the user's broker or state: every test names
# its own port and state directory, and what runs without them finds an empty one, not ~/.control-tower.
for _setting in [key for key in os.environ if key.startswith("CTL_")]:
    del os.environ[_setting]
ISOLATED_HOME = tempfile.mkdtemp(prefix="ctl-test-home-")
os.environ["HOME"] = ISOLATED_HOME
atexit.register(shutil.rmtree, ISOLATED_HOME, True)

from ctl import common as ctl_common  # noqa: E402
from ctl import launch  # noqa: E402
from agent_shim import read_line  # noqa: E402

BROKER = os.path.join(ROOT, "broker.py")
MCP_SERVER = os.path.join(ROOT, "mcp_server.py")
HOOK = os.path.join(ROOT, "hook.py")
AGENT_SHIM = os.path.join(ROOT, "tests", "agent_shim.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_lines_holding(*secrets: str) -> dict:
    """pid -> command line of every process on the machine whose command line holds one of the secrets (any
    local user can read every command line)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                line = handle.read()
        except OSError:                 # a process that ended while we looked
            continue
        if any(secret.encode() in line for secret in secrets if secret):
            found[int(pid)] = line.replace(b"\0", b" ").decode(errors="replace")
    return found


class BrokerProcess:
    """One broker subprocess; `kill9` and `start` again reuse the same port and state directory."""

    def __init__(self, env=None, state_dir=None, port=None, wrapper=()):
        self.wrapper = list(wrapper)        # e.g. strace: what the broker runs under
        self.port = port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="ctl-test-")
        os.chmod(self.tmp, 0o700)
        self.state_dir = state_dir or os.path.join(self.tmp, "state")
        self.env = {**os.environ, "CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state_dir, **(env or {})}
        self.proc = None
        self.log = None
        self.log_path = os.path.join(self.tmp, "broker.log")

    def start(self, wait=True):
        if self.log is not None:
            self.log.close()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, BROKER], env=self.env, stdout=self.log,
                                     stderr=self.log)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {self.read_log()}")
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except ctl_common.BrokerUnavailable:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"broker not healthy: {self.read_log()}")

    def read_log(self) -> str:
        with open(self.log_path, "rb") as handle:
            return handle.read().decode(errors="replace")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.log is not None:
            self.log.close()
            self.log = None

    def cleanup(self):
        self.stop()
        self.kill_detached()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def kill_detached(self):
        """Stop a broker that an MCP server started on this state directory (its pid is in broker.pid)."""
        pid = launch.recorded_pid(self.state_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def secret(self, name):
        return ctl_common.read_secret(self.state_dir, name)

    def request(self, method, path, body=None, token=None, timeout=10.0):
        client = ctl_common.BrokerClient(self.port, token=token, timeout=timeout)
        try:
            return client.request(method, path, body)
        finally:
            client.close()

    def raw(self, data: bytes, timeout=5.0) -> bytes:
        """Send raw bytes, return everything the broker answers before closing or going quiet."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                        break
            except socket.timeout:
                pass
            return b"".join(chunks)

    def join(self, name, role="worker", root=None, **extra):
        body = {"name": name, "role": role, "root": root or ROOT, **extra}
        status, data = self.request("POST", "/join", body, token=self.secret(ctl_common.JOIN_SECRET_FILE))
        if status != 200:
            raise AssertionError(f"join {name} failed: {status} {data}")
        return Peer(self, data)

    def raw_join(self, body, token=None):
        """POST /join as given (a root added unless the body names one), for tests of refusals."""
        body = body if "root" in body or "room" in body else {**body, "root": ROOT}
        return self.request("POST", "/join", body, token=token or self.secret(ctl_common.JOIN_SECRET_FILE))

    def operator(self, room=None):
        """The operator acting on one room: `room` (an id), else the only open room."""
        return Operator(self, room)

    def rooms(self):
        status, data = self.request("GET", "/rooms", token=self.secret(ctl_common.OPERATOR_TOKEN_FILE))
        assert status == 200, data
        return data["rooms"]

    def integrity(self) -> str:
        import sqlite3
        db = sqlite3.connect(os.path.join(self.state_dir, "broker.db"))
        try:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


class Peer:
    """A joined session talking HTTP to the broker with its own token."""

    def __init__(self, broker, joined):
        self.broker, self.joined = broker, joined
        self.token, self.name = joined["token"], joined["name"]

    def call(self, method, path, body=None, **kw):
        return self.broker.request(method, path, body, token=self.token, **kw)

    def ok(self, method, path, body=None, **kw):
        status, data = self.call(method, path, body, **kw)
        if status != 200:
            raise AssertionError(f"{method} {path} {body} -> {status} {data}")
        return data

    def send(self, to, content, category="info"):
        return self.call("POST", "/messages", {"to": to, "content": content, "category": category})

    def read(self, wait=0):
        return self.ok("GET", f"/inbox?wait={wait}")

    def drain(self):
        batch = self.read()
        if batch["messages"]:
            self.ok("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in batch["messages"]]})
        return batch["messages"]


class Operator(Peer):
    """The operator token; every room-scoped call names the room (the only open one unless told)."""

    UNSCOPED = ("/rooms", "/health")

    def __init__(self, broker, room=None):
        super().__init__(broker, {"token": broker.secret(ctl_common.OPERATOR_TOKEN_FILE), "name": "operator"})
        self.room = room

    def room_id(self):
        if self.room is None:
            open_rooms = [r for r in self.broker.rooms() if not r["archived"]]
            assert len(open_rooms) == 1, f"name the room: {open_rooms}"
            self.room = open_rooms[0]["id"]
        return self.room

    def call(self, method, path, body=None, **kw):
        route = path.partition("?")[0]
        if route not in self.UNSCOPED:
            if method == "GET":
                path += ("&" if "?" in path else "?") + f"room={self.room_id()}"
            else:
                body = {**(body or {}), "room": self.room_id()}
        return super().call(method, path, body, **kw)


class BrokerTestCase(unittest.TestCase):
    """A fresh broker for the whole class; `env` tunes it (lease, rate limit)."""

    env = {}

    @classmethod
    def setUpClass(cls):
        cls.broker = BrokerProcess(env={"CTL_RATE_LIMIT": "1000", **cls.env}).start()

    @classmethod
    def tearDownClass(cls):
        cls.broker.cleanup()


class McpSession:
    """`mcp_server.py` as a subprocess, driven over stdio with newline-delimited JSON-RPC."""

    def __init__(self, broker, cwd, env=None, name=None, agent=False):
        """With `agent`, the server runs under a stand-in for Claude Code that can also run hooks."""
        self.env = {**broker.env, **(env or {})}
        self.cwd = cwd
        if name:
            self.env["CTL_NAME"] = name
        command = [sys.executable, MCP_SERVER]
        self.agent_socket = None
        if agent:
            self.agent_socket = os.path.join(tempfile.mkdtemp(prefix="ctl-agent-"), "agent.sock")
            command = [sys.executable, AGENT_SHIM, self.agent_socket] + command
        self.proc = subprocess.Popen(command, cwd=cwd, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.next_id = 0
        self.lines = []
        self.notifications = []
        self.cond = threading.Condition()
        self.stderr = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _pump(self):
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode())
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)
            self.cond.notify_all()

    def _drain_stderr(self):
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace"))

    def write(self, obj_or_text):
        text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def next_message(self, timeout=15.0, match=None):
        """The next stdout line (parsed) that satisfies `match`; keeps the others for later calls."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for i, line in enumerate(self.lines):
                    if line is None:
                        raise EOFError("mcp_server closed stdout; stderr: " + "".join(self.stderr))
                    message = json.loads(line)
                    if match is None or match(message):
                        del self.lines[i]
                        return message
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise TimeoutError(f"no matching message; pending {self.lines}; stderr {''.join(self.stderr)}")
                self.cond.wait(remaining)

    def request(self, method, params=None, timeout=15.0):
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.write(message)
        wanted = self.next_id
        return self.next_message(timeout, match=lambda m: m.get("id") == wanted)

    def initialize(self, version="2025-11-25", structured=True, client="tests"):
        """Tests read structured results by asking for them, as any program may; the model's default is text."""
        capabilities = {"experimental": {"ctl/structured": {}}} if structured else {}
        reply = self.request("initialize", {"protocolVersion": version, "capabilities": capabilities,
                                            "clientInfo": {"name": client, "version": "1"}})
        self.write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply

    def call(self, tool, arguments=None, timeout=15.0):
        reply = self.request("tools/call", {"name": tool, "arguments": arguments or {}}, timeout=timeout)
        if "result" not in reply:
            raise AssertionError(f"tools/call {tool} gave a protocol error: {reply}")
        return reply["result"]

    def ok(self, tool, arguments=None, timeout=15.0):
        result = self.call(tool, arguments, timeout)
        if result.get("isError"):
            raise AssertionError(f"{tool} {arguments} failed: {result['content'][0]['text']}")
        return result["structuredContent"]

    def hook(self, event, payload=None, env=None, extra_args=(), python_flags=()):
        """Run hook.py as Claude Code would, as a child of this session's agent: the documented JSON on
        stdin; returns (exit code, parsed stdout or None, stderr). python_flags go to the interpreter."""
        deadline = time.time() + 10
        while not os.path.exists(self.agent_socket) and time.time() < deadline:
            time.sleep(0.02)
        request = {"argv": [sys.executable, *python_flags, HOOK, *extra_args, event], "cwd": self.cwd,
                   "stdin": json.dumps({"session_id": "test-session", "cwd": self.cwd, "hook_event_name": event,
                                        **(payload or {})}),
                   "env": {"CTL_PORT": self.env["CTL_PORT"], "CTL_STATE_DIR": self.env["CTL_STATE_DIR"], **(env or {})}}
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(self.agent_socket)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(read_line(sock))
        return reply["code"], (json.loads(reply["stdout"]) if reply["stdout"].strip() else None), reply["stderr"]

    def close(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def dispose(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass
