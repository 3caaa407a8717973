"""What the Codex and Gemini conformance runs share: a scripted stand-in for a model API on 127.0.0.1, and a
scene of a fresh HOME, our own broker and state directory, a project whose `locked.txt` a second session holds.

    scene = Scene("codex", cli_bin)          # HOME, CTL_PORT, CTL_STATE_DIR of its own; broker running
    standin = StandIn(answer).start()        # answer(request) -> (content type, body bytes)
    scene.run_install("--client", "codex", "--hooks")
    ... run the CLI with scene.env ...
    scene.check(condition, "what must hold")  # every check printed; scene.finish() is the exit code

The session under test is whichever peer of the room is not the holder (its name is its folder's, as a new user
would get it). Standard library only, plus the project's test helpers (a real broker, never a mock).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from helpers import ROOT, BrokerProcess, free_port  # noqa: E402

INSTALL = os.path.join(ROOT, "install.py")
LOCKED_TEXT = "held by the other session\n"
FREE_TEXT = "free to edit\n"
MESSAGE = "Please leave locked.txt to me until I push; ping me when you are done."
# The shell writes each CLI's model makes to the held file: named ones the hook reads (denied), a read, and the
# same writes from the sub/ folder a call names (the held file through ../ denied, a free sub/locked.txt run).
SHELL_DENIED = ("echo overwritten > locked.txt", "sed -i s/held/taken/ locked.txt")
SHELL_READ = "cat locked.txt"
SHELL_IN_SUB = {"echo sub > ../locked.txt": True, "echo sub > locked.txt": False}


def unseen_shell_writes(writer: str) -> tuple:
    """Writes the hook cannot see into ({command: exit code}: a failed command is reported too), and what they
    leave appended to the held file."""
    return ({f"python3 -c \"open('locked.txt', 'a').write('stamped by {writer}\\n')\"": 0,
             "python3 -c \"open('locked.txt', 'a').write('stamped again\\n'); raise SystemExit(3)\"": 3},
            f"stamped by {writer}\nstamped again\n")


class StandIn:
    """A model API on a free loopback port answering each POST from a script; every request is recorded as
    {"path", "body"} (body parsed as JSON when it is)."""

    def __init__(self, answer):
        self.answer, self.requests, self.lock = answer, [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = raw.decode(errors="replace")
                request = {"path": self.path, "body": body}
                with outer.lock:
                    outer.requests.append(request)
                    try:
                        content_type, data = outer.answer(request)
                        status = 200
                    except Exception as exc:            # a script that cannot answer says so, never hangs
                        content_type, data, status = "application/json", json.dumps(
                            {"error": {"message": f"stand-in: {exc!r}", "code": 500}}).encode(), 500
                        request["error"] = repr(exc)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def start(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def sse(events) -> bytes:
    """Server-sent events: (event name or None, JSON data) pairs."""
    return "".join((f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
                   for name, data in events).encode()


class Scene:
    def __init__(self, client: str, cli_bin: str):
        self.client = client
        self.tmp = tempfile.mkdtemp(prefix=f"ctl-{client}-real-")
        self.home = os.path.join(self.tmp, "home")
        self.project = os.path.join(self.tmp, "proj")
        for folder in (self.home, self.project):
            os.makedirs(folder)
        self.broker = BrokerProcess(state_dir=os.path.join(self.home, "state"), port=free_port())
        self.env = {"HOME": self.home, "PATH": f"{cli_bin}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                    "CTL_PORT": str(self.broker.port), "CTL_STATE_DIR": self.broker.state_dir,
                    "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1"}
        subprocess.run(["git", "init", "-q", self.project], check=True)
        self.write("locked.txt", LOCKED_TEXT)
        self.write("free.txt", FREE_TEXT)
        self.failures = 0
        self.broker.start()
        self.holder = self.broker.join("holder", root=self.project)
        self.holder.ok("POST", "/locks", {"path": "locked.txt", "reason": "release branch"})

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.project, name), "w") as handle:
            handle.write(text)

    def read(self, name: str) -> str:
        with open(os.path.join(self.project, name)) as handle:
            return handle.read()

    def run_install(self, *args) -> str:
        done = subprocess.run([sys.executable, INSTALL, *args], env=self.env, cwd=self.project,
                              capture_output=True, text=True, timeout=120)
        print(f"$ install.py {' '.join(args)}\n{done.stdout}{done.stderr}".rstrip())
        if done.returncode != 0:
            raise SystemExit(f"FAILED: install.py {' '.join(args)} exited {done.returncode}")
        return done.stdout

    def peers(self) -> list:
        return [p["name"] for p in self.holder.ok("GET", "/peers")["peers"] if p["name"] != "holder"]

    def locks(self) -> dict:
        return {lock["path"]: lock for lock in self.holder.ok("GET", "/locks")["locks"]}

    def check(self, condition, what: str, detail: str = "") -> bool:
        print(f"{'ok  ' if condition else 'FAIL'} {what}" + ("" if condition or not detail else f"\n     {detail}"))
        self.failures += 0 if condition else 1
        return bool(condition)

    def check_unseen_writes_reported(self, last_request: str, report: str, unseen: int, stamped: str, session):
        """After the writes the hook could not see: each report reached the model once and never showed our
        command line, nothing was undone, each write is a lock_violation, and the holder was told."""
        self.check(last_request.count(report) == unseen and "hook.py" not in last_request,
                   f"each report reached the model once, without our command line ({last_request.count(report)} in all)")
        self.check(self.read("locked.txt") == LOCKED_TEXT + stamped, "nothing was undone behind anyone's back",
                   repr(self.read("locked.txt")))
        events = self.broker.operator().ok("GET", "/state").get("events", [])
        violations = [e for e in events if e.get("kind") == "lock_violation"]
        self.check(len(violations) == unseen and all(
                   v.get("actor") == session and "locked.txt" in v.get("detail", "") for v in violations),
                   "each unseen write is a lock_violation event the human sees (GET /state)", str(events[-6:]))
        told_holder = [m["content"] for m in self.holder.ok("GET", "/inbox")["messages"]]
        self.check(any("locked.txt" in text and str(session) in text for text in told_holder),
                   "the holder is told: a message naming the file and the writer", str(told_holder))

    def finish(self, label: str) -> int:
        self.broker.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(f"{label}: {'all checks passed' if not self.failures else f'{self.failures} check(s) FAILED'}")
        return 1 if self.failures else 0


def occurrences(requests: list, text: str) -> int:
    """How often `text` appears in the last request: the whole conversation as the model last saw it."""
    return json.dumps(requests[-1]["body"], ensure_ascii=False).count(text) if requests else 0


def around(requests: list, text: str, width: int = 400) -> str:
    """The last request's text around `text` (as sent), for a failed check's detail."""
    flat = json.dumps(requests[-1]["body"], ensure_ascii=False) if requests else ""
    at = flat.find(text)
    return flat[max(0, at - width):at + len(text) + 100] if at >= 0 else "(not there)"


def fenced(requests: list, text: str) -> bool:
    """`text` sits inside one of our fences in the last request: `<<<peer-text NONCE` ... `peer-text NONCE>>>`.
    A client may XML-escape the angle brackets of hook text (Codex's <hook_prompt> does): the same fence."""
    flat = json.dumps(requests[-1]["body"], ensure_ascii=False) if requests else ""
    flat = flat.replace("&lt;", "<").replace("&gt;", ">")
    return re.search(r"<<<peer-text ([0-9a-f]+)[^<]*?" + re.escape(text) + r".*?peer-text \1>>>", flat, re.S) is not None
