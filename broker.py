#!/usr/bin/env python3
"""Control Tower Lite broker: the one stateful process (peers, messages, tasks, locks, memory, auth).

Concurrency design: one thread runs a `selectors` event loop and owns the SQLite connection.
The loop only buffers bytes until a request is complete (the head parsed strictly, bounded in
size and by a deadline), then runs it to completion as one SQLite transaction.
An idle, dripping or stalled client costs a buffer, never the loop's time, so no client can
hold up another; and since one thread owns the state, domain code needs no locks. A waiting
inbox read parks its connection and is answered by the same loop right after the commit that
delivers to it. We chose this over threads feeding a state thread: state has one owner by
construction, and no request pays a hand-off between threads.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import hmac
import html
import ipaddress
import json
import os
import re
import selectors
import signal
import socket
import sqlite3
import sys
import time
import traceback
import unicodedata
import urllib.parse
from base64 import b64encode
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus

import ctl_common
from ctl_common import StateError, TokenSigner

# ---------------------------------------------------------------- settings


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StateError(f"{name} must be a whole number, got {raw!r}")
    if not low <= value <= high:
        raise StateError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    rate_limit: int        # messages per minute per peer; a broadcast counts per recipient
    lease_seconds: int     # a peer silent for this long is dead: its claims and locks are released
    token_ttl: int         # seconds a peer token stays valid before the session must rejoin
    retention: int         # messages kept for the feed; unread ones are never dropped
    max_connections: int

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            rate_limit=_env_int("CTL_RATE_LIMIT", 10, 1, 1_000_000),
            lease_seconds=_env_int("CTL_LEASE_SECONDS", 30, 2, 86_400),
            token_ttl=_env_int("CTL_TOKEN_TTL", 86_400, 1, 30 * 86_400),
            retention=_env_int("CTL_RETENTION", 100_000, 100, 100_000_000),
            max_connections=_env_int("CTL_MAX_CONNECTIONS", 512, 8, 10_000),
        )


MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 6
REQUEST_TIMEOUT = 10.0      # a request must arrive whole within this, however it drips
IDLE_TIMEOUT = 120.0        # keep-alive connections with nothing in flight
WRITE_TIMEOUT = 10.0
MAX_WAIT_SECONDS = 60
EVENTS_KEPT = 2000
PRUNE_EVERY = 30.0          # seconds between retention passes
CATEGORIES = ("info", "question", "answer", "status", "handoff", "blocker")
TASK_STATUSES = ("blocked", "ready", "claimed", "done")
ROOM_STATES = ("running", "paused", "stopped")
LIMITS = {"title": 200, "description": 4000, "content": 8000, "summary": 2000, "reason": 200,
          "path": 1024, "mem_key": 128, "mem_value": 8000, "files": 100, "depends_on": 50,
          "tasks": 10_000, "memory_keys": 256}

# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A refusal the client can act on: HTTP status, a stable code, and a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


# ---------------------------------------------------------------- content filter
# A tripwire, not a wall: it catches the common injection shapes after undoing the usual disguises
# (compatibility forms, entities, percent-escapes, look-alike letters). Provenance is the real defence.

_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ɡ": "g", "ı": "i", "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i",
    "κ": "k", "τ": "t", "υ": "u", "χ": "x", "ε": "e", "ѵ": "v", "ո": "n", "ս": "u",
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "ᐸ": "<", "ᐳ": ">",
    "˂": "<", "˃": ">", "❮": "<", "❯": ">", "＜": "<", "＞": ">", "‐": "-", "‑": "-", "–": "-",
})
_VARIATION_SELECTORS = re.compile("[\u034f\ufe00-\ufe0f\U000e0100-\U000e01ef\u115f\u1160\u3164\uffa0\u2800]")
FILTER_RULES = {
    "tool-call-markup": re.compile(
        r"<\s*/?\s*(?:[a-z]+\s*:\s*)?(?:function_calls|function_results|invoke|parameter|tool_use|"
        r"tool_result|tool_call|function_call|tool_calls)\b"),
    "function-call-json": re.compile(
        r"\"(?:tool_calls|function_call|tool_use)\"\s*:|\{\s*\"name\"\s*:\s*\"[^\"]*\"\s*,\s*\"(?:arguments|parameters|input)\"\s*:"
        r"|\"type\"\s*:\s*\"(?:function|tool_use|tool_call)\""),
    "chat-role-marker": re.compile(
        r"(?:^|\n)\s*(?:human|assistant|system)\s*:|<\|\s*(?:im_start|im_end|im_sep|endoftext|system|user|"
        r"assistant|eot_id|start_header_id|end_header_id)\s*\|>|\[/?inst\]|<<\s*/?\s*sys\s*>>"),
    "system-tag": re.compile(r"<\s*/?\s*(?:system[\w-]*|instructions?|developer[\w-]*|im_start)\b[^>]*>"),
    "data-uri": re.compile(r"\bdata\s*:\s*[a-z0-9.+-]+/[a-z0-9.+-]+\s*[;,]"),
    "remote-image": re.compile(r"!\[[^\]]*\]\(\s*<?\s*(?:[a-z][a-z0-9+.-]*:)?//|<\s*img\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:[a-z]+:)?//"),
}


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{120,}")


def _has_base64_run(normal: str) -> bool:
    """Long runs that mix upper case, lower case and digits, as encoded binary does (a row of x's does not)."""
    return any(re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"\d", run)
               for run in _BASE64_RUN.findall(normal))


def _disguises_undone(text: str) -> str:
    """The text as a reader would see it: entities and escapes decoded, look-alikes folded."""
    folded = text
    for _ in range(3):
        decoded = urllib.parse.unquote(html.unescape(folded))
        if decoded == folded:
            break
        folded = decoded
    return unicodedata.normalize("NFKC", folded).casefold().translate(_LOOKALIKES)


def screen_text(field: str, text: str) -> str:
    """Return the NFKC form of `text`, or raise 422 naming the rule it broke (never echoing it)."""
    normal = unicodedata.normalize("NFKC", text)
    for char in normal:
        category = unicodedata.category(char)
        if (category in ("Cf", "Co", "Cs", "Cn", "Zl", "Zp") or (category == "Cc" and char not in "\t\n\r")):
            raise ApiError(422, "content_filtered",
                           f"{field} contains an invisible or control character (U+{ord(char):04X}); remove it",
                           rule="invisible-character", field=field)
    if _VARIATION_SELECTORS.search(normal):
        raise ApiError(422, "content_filtered", f"{field} contains an invisible filler character; remove it",
                       rule="invisible-character", field=field)
    seen = _disguises_undone(normal)
    broken = next((rule for rule, pattern in FILTER_RULES.items() if pattern.search(seen)), None)
    if broken is None and _has_base64_run(normal):
        broken = "base64-run"
    if broken is not None:
        raise ApiError(422, "content_filtered",
                       f"{field} was refused by the content filter (rule {broken}); rephrase it as plain prose",
                       rule=broken, field=field)
    return normal


# ---------------------------------------------------------------- names

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
RESERVED_NAMES = {"*", "operator", "system", "broker", "all", "everyone", "architect", "human", "admin",
                  "root", "user", "assistant", "dashboard", "observer", "null", "none", "nobody", "server"}
_SKELETON = str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s", "|": "l"})


def name_skeleton(name: str) -> str:
    """Names that look alike share a skeleton: case, separators and 0/o, 1/l/i, rn/m folded."""
    plain = re.sub(r"[._-]", "", name.lower()).replace("rn", "m").replace("vv", "w")
    return plain.translate(_SKELETON)


RESERVED_SKELETONS = {name_skeleton(n) for n in RESERVED_NAMES if n != "*"}


# ---------------------------------------------------------------- storage and rules

SCHEMA = """
CREATE TABLE IF NOT EXISTS peers(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, generation INTEGER NOT NULL,
  status TEXT NOT NULL, summary TEXT NOT NULL DEFAULT '', root TEXT, joined_at REAL NOT NULL,
  last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages(
  id INTEGER PRIMARY KEY, sender TEXT NOT NULL, sender_role TEXT NOT NULL, origin TEXT NOT NULL,
  recipient TEXT NOT NULL, category TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL,
  flagged INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS deliveries(
  id INTEGER PRIMARY KEY, peer_id INTEGER NOT NULL, message_id INTEGER NOT NULL,
  acked INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS deliveries_unread ON deliveries(peer_id, id) WHERE acked = 0;
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries(message_id);
CREATE TABLE IF NOT EXISTS tasks(
  id INTEGER PRIMARY KEY, title TEXT NOT NULL, description TEXT NOT NULL, status TEXT NOT NULL,
  created_by TEXT NOT NULL, created_at REAL NOT NULL, assignee_id INTEGER, claimed_at REAL,
  done_by TEXT, done_at REAL, summary TEXT, files TEXT);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, id);
CREATE INDEX IF NOT EXISTS tasks_assignee ON tasks(assignee_id) WHERE assignee_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS task_deps(
  task_id INTEGER NOT NULL, depends_on INTEGER NOT NULL, PRIMARY KEY(task_id, depends_on));
CREATE INDEX IF NOT EXISTS task_deps_reverse ON task_deps(depends_on);
CREATE TABLE IF NOT EXISTS locks(
  path TEXT PRIMARY KEY, display TEXT NOT NULL, holder_id INTEGER NOT NULL, reason TEXT NOT NULL,
  acquired_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS locks_holder ON locks(holder_id);
CREATE TABLE IF NOT EXISTS memory(
  key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_by TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS room(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Actor:
    """Who is asking, as proven by the token: never as claimed by the body."""
    kind: str                 # peer | operator | observer | watch | public
    peer: sqlite3.Row = None

    @property
    def name(self) -> str:
        return self.peer["name"] if self.peer is not None else self.kind

    @property
    def role(self) -> str:
        return self.peer["role"] if self.peer is not None else self.kind


class RateLimiter:
    """A sliding one-minute window per peer, in memory: a restart forgives, which is fine for a brake."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.sent = {}

    def check(self, peer_id: int, cost: int, now: float) -> None:
        window = self.sent.setdefault(peer_id, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) + cost > self.per_minute:
            if cost > self.per_minute:
                raise ApiError(429, "rate_limited",
                               f"this send needs {cost} of your {self.per_minute} messages per minute; "
                               "send to fewer peers", retry_after=60)
            oldest_needed = window[len(window) + cost - self.per_minute - 1]
            wait = max(1, int(oldest_needed + 60 - now + 0.999))
            raise ApiError(429, "rate_limited",
                           f"rate limit of {self.per_minute} messages per minute reached; "
                           f"wait {wait}s, or batch your news into one message", retry_after=wait)

    def spend(self, peer_id: int, cost: int, now: float) -> None:
        self.sent.setdefault(peer_id, deque()).extend([now] * cost)


def resolve_lock_path(root: str, path: str) -> str:
    """One canonical absolute path per file, however it is spelled; refuse anything outside the root."""
    if not path.strip():
        raise ApiError(400, "bad_path", "path is empty; give a file path inside your project")
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    real_root = os.path.realpath(root)
    if real == real_root or not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ApiError(400, "path_outside_root",
                       f"path must name a file inside your project root {real_root}")
    return real


class Store:
    """Every rule of the room, each operation one `BEGIN IMMEDIATE` transaction on a WAL database."""

    def __init__(self, db_path: str, settings: Settings):
        self.settings = settings
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM room WHERE key='state'").fetchone()
        self.room = row["value"] if row else "running"     # cached: read on every request, written rarely
        self.limiter = RateLimiter(settings.rate_limit)
        self.version = int(time.time() * 1000)   # bumps on every change the dashboard draws
        self.woken = set()                      # peer ids whose waiting reads should be retried
        self.wake_everyone = False

    @contextlib.contextmanager
    def tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def _changed(self) -> None:
        self.version += 1

    # -- room, peers and leases

    def room_state(self) -> str:
        return self.room

    def peer_by_id(self, peer_id: int):
        return self.db.execute("SELECT * FROM peers WHERE id=?", (peer_id,)).fetchone()

    def peer_by_name(self, name: str):
        return self.db.execute("SELECT * FROM peers WHERE name=?", (name,)).fetchone()

    def _alive_cutoff(self, now: float) -> float:
        return now - self.settings.lease_seconds

    def _is_alive(self, peer, now: float) -> bool:
        return peer["status"] == "active" and peer["last_seen"] >= self._alive_cutoff(now)

    def _architect(self, now: float):
        row = self.db.execute("SELECT * FROM peers WHERE role='architect' AND status='active'").fetchone()
        return row if row is not None and self._is_alive(row, now) else None

    def _release_peer(self, peer_id: int, status: str) -> None:
        """A peer left, died or was kicked: its claims go back to ready and its locks are freed."""
        self.db.execute("UPDATE peers SET status=? WHERE id=?", (status, peer_id))
        self.db.execute("UPDATE tasks SET status='ready', assignee_id=NULL, claimed_at=NULL "
                        "WHERE assignee_id=? AND status='claimed'", (peer_id,))
        self.db.execute("DELETE FROM locks WHERE holder_id=?", (peer_id,))
        self._changed()

    def _reap(self, now: float) -> list:
        dead = self.db.execute("SELECT id, name FROM peers WHERE status='active' AND last_seen < ?",
                               (self._alive_cutoff(now),)).fetchall()
        for row in dead:
            self._release_peer(row["id"], "dead")
            self._event(now, "peer_dead", row["name"], "lease expired; claims and locks released")
        return dead

    def reap(self, now: float) -> list:
        """Run by the loop's tick and inside every lease-sensitive operation, so no thread has to survive."""
        with self.tx():
            return self._reap(now)

    def _touch(self, peer, now: float) -> None:
        """Renew the peer's lease; a peer that was declared dead comes back, without its old claims."""
        self.db.execute("UPDATE peers SET last_seen=?, status='active' WHERE id=?", (now, peer["id"]))
        if peer["status"] != "active":
            self._changed()

    def join(self, name: str, role, summary: str, root, resumed_peer_id, now: float):
        """Without a role, a resumed session keeps the one it holds (an operator's change sticks)."""
        with self.tx():
            self._reap(now)
            row = self.peer_by_name(name)
            resumed = row is not None and resumed_peer_id == row["id"]
            if row is not None and row["status"] == "kicked":
                raise ApiError(403, "kicked", f"the operator removed {name!r}; ask the human before rejoining")
            if row is not None and self._is_alive(row, now) and not resumed:
                raise ApiError(409, "name_taken",
                               f"{name!r} is in use by a live session; pick another name")
            skeleton = name_skeleton(name)
            if skeleton in RESERVED_SKELETONS:
                raise ApiError(400, "reserved_name", f"{name!r} is reserved; pick another name")
            for other in self.db.execute("SELECT * FROM peers WHERE name != ? AND status='active'", (name,)):
                if self._is_alive(other, now) and name_skeleton(other["name"]) == skeleton:
                    raise ApiError(409, "lookalike_name",
                                   f"{name!r} looks like the live peer {other['name']!r}; pick a distinct name")
            role = role or (row["role"] if resumed else "worker")
            if role == "architect":
                seat = self._architect(now)
                if seat is not None and seat["name"] != name:
                    raise ApiError(409, "architect_seat_taken",
                                   f"{seat['name']} holds the architect seat; join as a worker, "
                                   "or ask the human to hand the seat over")
                self.db.execute("UPDATE peers SET role='worker', generation=generation+1 "
                                "WHERE role='architect' AND name != ?", (name,))
            if row is None:
                cursor = self.db.execute(
                    "INSERT INTO peers(name, role, generation, status, summary, root, joined_at, last_seen) "
                    "VALUES(?,?,1,'active',?,?,?,?)", (name, role, summary, root, now, now))
                peer_id = cursor.lastrowid
            else:
                peer_id = row["id"]
                self.db.execute("UPDATE peers SET role=?, generation=generation+1, status='active', summary=?, "
                                "root=COALESCE(?, root), joined_at=?, last_seen=? WHERE id=?",
                                (role, summary, root, now, now, peer_id))
            self._event(now, "joined", name, f"as {role}" + (" (resumed)" if resumed else ""))
            self._changed()
            return self.peer_by_id(peer_id)

    def leave(self, peer, now: float) -> None:
        with self.tx():
            self._release_peer(peer["id"], "left")
            self._event(now, "left", peer["name"], "claims and locks released")

    def heartbeat(self, peer, summary, now: float) -> dict:
        with self.tx():
            self._reap(now)
            self._touch(peer, now)
            if summary is not None:
                self.db.execute("UPDATE peers SET summary=? WHERE id=?", (summary, peer["id"]))
                self._changed()
            unread = self.db.execute("SELECT COUNT(*) FROM deliveries WHERE peer_id=? AND acked=0",
                                     (peer["id"],)).fetchone()[0]
        return {"room": self.room_state(), "unread": unread, "lease_seconds": self.settings.lease_seconds}

    def peer_view(self, peer, now: float) -> dict:
        age = now - peer["last_seen"]
        if peer["status"] != "active":
            state = peer["status"]
        elif age >= self.settings.lease_seconds:
            state = "dead"
        elif age >= self.settings.lease_seconds / 2:
            state = "stale"
        else:
            state = "alive"
        return {"name": peer["name"], "role": peer["role"], "state": state, "summary": peer["summary"],
                "last_seen": round(peer["last_seen"], 3)}

    def list_peers(self, now: float, include_gone: bool = False) -> list:
        rows = self.db.execute("SELECT * FROM peers ORDER BY id").fetchall()
        views = [self.peer_view(r, now) for r in rows]
        return views if include_gone else [v for v in views if v["state"] in ("alive", "stale")]

    # -- messages

    def send(self, actor: Actor, to: str, content: str, category: str, now: float) -> dict:
        with self.tx():
            self._reap(now)
            state = self.room_state()
            if state == "stopped" and actor.kind != "operator":
                raise ApiError(423, "room_stopped", "the operator stopped the room; stop working and wait for the human")
            sender_id = actor.peer["id"] if actor.peer is not None else None
            if sender_id is not None:
                self._touch(actor.peer, now)
            if to == "*":
                recipients = [r for r in self.db.execute("SELECT * FROM peers WHERE status='active' ORDER BY id")
                              if r["id"] != sender_id and self._is_alive(r, now)]
            else:
                target = self.peer_by_name(to)
                if target is None or target["status"] == "kicked":
                    live = ", ".join(p["name"] for p in self.list_peers(now)) or "nobody"
                    raise ApiError(404, "unknown_peer", f"no peer named {to!r}; in the room: {live}")
                if target["id"] == sender_id:
                    raise ApiError(400, "self_message", "you cannot message yourself")
                recipients = [target]
            architect = self._architect(now)
            if category == "blocker" and architect is not None and architect["id"] != sender_id \
                    and all(r["id"] != architect["id"] for r in recipients):
                recipients.append(architect)
            cost = max(1, len(recipients))
            if actor.kind == "peer":
                self.limiter.check(sender_id, cost, now)
            origin = "operator" if actor.kind == "operator" else "agent"
            cursor = self.db.execute(
                "INSERT INTO messages(sender, sender_role, origin, recipient, category, content, created_at, flagged) "
                "VALUES(?,?,?,?,?,?,?,?)",
                (actor.name, actor.role, origin, to, category, content, now, int(category == "blocker")))
            message_id = cursor.lastrowid
            self.db.executemany("INSERT INTO deliveries(peer_id, message_id) VALUES(?,?)",
                                [(r["id"], message_id) for r in recipients])
            if actor.kind == "peer":
                self.limiter.spend(sender_id, cost, now)
            self.woken.update(r["id"] for r in recipients)
        result = {"message_id": message_id, "delivered_to": [r["name"] for r in recipients]}
        if state == "paused" and origin == "agent":
            result["held"] = "the room is paused; delivery resumes when the human resumes it"
        if category == "blocker":
            result["flagged"] = "shown to the human" + ("" if architect else "; no architect is in the room")
        return result

    def inbox(self, peer_id: int, limit: int) -> dict:
        """Unread messages, oldest first; they stay unread until acknowledged, so a crash loses none."""
        state = self.room_state()
        held = "AND m.origin != 'agent'" if state == "paused" else ""
        rows = self.db.execute(
            "SELECT d.id AS delivery_id, m.* FROM deliveries d JOIN messages m ON m.id = d.message_id "
            f"WHERE d.peer_id=? AND d.acked=0 {held} ORDER BY d.id LIMIT ?", (peer_id, limit)).fetchall()
        return {"room": state, "messages": [self._message_view(r, r["delivery_id"]) for r in rows]}

    @staticmethod
    def _message_view(row, delivery_id=None) -> dict:
        view = {"id": row["id"], "from": row["sender"], "from_role": row["sender_role"], "origin": row["origin"],
                "to": row["recipient"], "category": row["category"], "content": row["content"],
                "at": round(row["created_at"], 3)}
        if delivery_id is not None:
            view["delivery_id"] = delivery_id
        if row["flagged"]:
            view["flagged"] = True
        return view

    def ack(self, peer_id: int, delivery_ids: list) -> dict:
        with self.tx():
            marks = ",".join("?" * len(delivery_ids))
            cursor = self.db.execute(f"UPDATE deliveries SET acked=1 WHERE peer_id=? AND acked=0 AND id IN ({marks})",
                                     (peer_id, *delivery_ids))
        return {"acked": cursor.rowcount}

    # -- tasks

    def _task(self, task_id: int):
        row = self.db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        if row is None:
            raise ApiError(404, "unknown_task", f"no task {task_id}; call list_tasks to see the ids")
        return row

    def _deps(self, task_id: int) -> list:
        return [r[0] for r in self.db.execute("SELECT depends_on FROM task_deps WHERE task_id=? ORDER BY depends_on",
                                              (task_id,))]

    def _waiting_on(self, task_id: int) -> list:
        return [r[0] for r in self.db.execute(
            "SELECT d.depends_on FROM task_deps d JOIN tasks t ON t.id = d.depends_on "
            "WHERE d.task_id=? AND t.status != 'done' ORDER BY d.depends_on", (task_id,))]

    def _task_views(self, rows: list) -> list:
        """Views of many tasks in two queries, not three per task: the dashboard lists them all."""
        edges = ("SELECT d.task_id, d.depends_on, t.status FROM task_deps d JOIN tasks t ON t.id = d.depends_on"
                 + (" WHERE d.task_id = ?" if len(rows) == 1 else "") + " ORDER BY d.depends_on")
        deps = {}
        for task_id, dependency, status in self.db.execute(edges, (rows[0]["id"],) if len(rows) == 1 else ()):
            deps.setdefault(task_id, []).append((dependency, status))
        names = dict(self.db.execute("SELECT id, name FROM peers").fetchall())
        views = []
        for row in rows:
            edges_of = deps.get(row["id"], [])
            view = {"id": row["id"], "title": row["title"], "status": row["status"],
                    "depends_on": [d for d, _ in edges_of]}
            if row["description"]:
                view["description"] = row["description"]
            if row["status"] == "blocked":
                view["waiting_on"] = [d for d, status in edges_of if status != "done"]
            if row["assignee_id"] is not None:
                view["assignee"] = names.get(row["assignee_id"])
            if row["status"] == "done":
                view.update(done_by=row["done_by"], summary=row["summary"], files=json.loads(row["files"] or "[]"))
            views.append(view)
        return views

    def _task_view(self, row) -> dict:
        return self._task_views([row])[0]

    def _check_deps_exist(self, depends_on: list) -> None:
        if not depends_on:
            return
        marks = ",".join("?" * len(depends_on))
        found = {r[0] for r in self.db.execute(f"SELECT id FROM tasks WHERE id IN ({marks})", depends_on)}
        missing = [d for d in depends_on if d not in found]
        if missing:
            raise ApiError(400, "unknown_dependency", f"depends_on names unknown task ids {missing}")

    def _status_from_deps(self, task_id: int) -> str:
        return "blocked" if self._waiting_on(task_id) else "ready"

    def create_task(self, actor: Actor, title: str, description: str, depends_on: list, now: float) -> dict:
        with self.tx():
            if self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] >= LIMITS["tasks"]:
                raise ApiError(507, "too_many_tasks", f"the room holds at most {LIMITS['tasks']} tasks")
            self._check_deps_exist(depends_on)
            task_id = self.db.execute(
                "INSERT INTO tasks(title, description, status, created_by, created_at) VALUES(?,?,'blocked',?,?)",
                (title, description, actor.name, now)).lastrowid
            self.db.executemany("INSERT INTO task_deps VALUES(?,?)", [(task_id, d) for d in depends_on])
            self.db.execute("UPDATE tasks SET status=? WHERE id=?", (self._status_from_deps(task_id), task_id))
            self._changed()
            return self._task_view(self._task(task_id))

    def _reaches(self, start: int, goal: int) -> bool:
        """Whether `goal` is among the transitive dependencies of `start`."""
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(self._deps(node))
        return False

    def update_task(self, task_id: int, fields: dict, now: float) -> dict:
        with self.tx():
            task = self._task(task_id)
            if "depends_on" in fields:
                depends_on = fields["depends_on"]
                if task["status"] in ("claimed", "done"):
                    raise ApiError(409, "task_not_editable",
                                   f"task {task_id} is {task['status']}; only blocked or ready tasks change dependencies")
                self._check_deps_exist(depends_on)
                cyclic = [d for d in depends_on if d == task_id or self._reaches(d, task_id)]
                if cyclic:
                    raise ApiError(409, "dependency_cycle",
                                   f"depending on {cyclic} would make a cycle through task {task_id}")
                self.db.execute("DELETE FROM task_deps WHERE task_id=?", (task_id,))
                self.db.executemany("INSERT INTO task_deps VALUES(?,?)", [(task_id, d) for d in depends_on])
                self.db.execute("UPDATE tasks SET status=? WHERE id=?", (self._status_from_deps(task_id), task_id))
            for column in ("title", "description"):
                if column in fields:
                    self.db.execute(f"UPDATE tasks SET {column}=? WHERE id=?", (fields[column], task_id))
            self._changed()
            return self._task_view(self._task(task_id))

    def list_tasks(self, status) -> dict:
        if status:
            rows = self.db.execute("SELECT * FROM tasks WHERE status=? ORDER BY id", (status,)).fetchall()
        else:
            rows = self.db.execute("SELECT * FROM tasks ORDER BY id").fetchall()
        counts = dict.fromkeys(TASK_STATUSES, 0)
        for row in self.db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"):
            counts[row[0]] = row[1]
        return {"tasks": self._task_views(rows) if rows else [], "counts": counts}

    def claim(self, peer, task_id, now: float) -> dict:
        with self.tx():
            self._reap(now)
            self._touch(peer, now)
            if self.room_state() == "stopped":
                raise ApiError(423, "room_stopped", "the operator stopped the room; stop working and wait for the human")
            if task_id is None:
                row = self.db.execute("SELECT id FROM tasks WHERE status='ready' ORDER BY id LIMIT 1").fetchone()
                if row is None:
                    counts = self.list_tasks(None)["counts"]
                    raise ApiError(404, "no_ready_task",
                                   f"no task is ready ({counts['blocked']} blocked, {counts['claimed']} claimed, "
                                   f"{counts['done']} done); check your inbox and try again later")
                task_id = row["id"]
            task = self._task(task_id)
            if task["status"] != "ready":
                raise ApiError(409, "task_not_ready", self._why_not_ready(task))
            self.db.execute("UPDATE tasks SET status='claimed', assignee_id=?, claimed_at=? "
                            "WHERE id=? AND status='ready'", (peer["id"], now, task_id))
            self._event(now, "claimed", peer["name"], f"task {task_id}")
            self._changed()
            return self._task_view(self._task(task_id))

    def _why_not_ready(self, task) -> str:
        if task["status"] == "blocked":
            return f"task {task['id']} is blocked, waiting on tasks {self._waiting_on(task['id'])}"
        if task["status"] == "claimed":
            holder = self.peer_by_id(task["assignee_id"])
            return f"task {task['id']} is already claimed by {holder['name'] if holder else 'another peer'}"
        return f"task {task['id']} is already done by {task['done_by']}"

    def complete(self, actor: Actor, task_id: int, summary: str, files: list, now: float) -> dict:
        with self.tx():
            self._reap(now)
            task = self._task(task_id)
            if actor.kind == "peer":
                self._touch(actor.peer, now)
                if task["status"] != "claimed" or task["assignee_id"] != actor.peer["id"]:
                    why = (f"task {task_id} is ready: your claim expired or was released; claim it again"
                           if task["status"] == "ready" else self._why_not_ready(task))
                    raise ApiError(409, "not_your_claim", why)
            elif task["status"] == "done":
                raise ApiError(409, "task_not_ready", self._why_not_ready(task))
            self.db.execute("UPDATE tasks SET status='done', done_by=?, done_at=?, summary=?, files=?, "
                            "assignee_id=NULL WHERE id=?", (actor.name, now, summary, json.dumps(files), task_id))
            unblocked = []
            for (dependent,) in self.db.execute("SELECT task_id FROM task_deps WHERE depends_on=?", (task_id,)).fetchall():
                if self._task(dependent)["status"] == "blocked" and not self._waiting_on(dependent):
                    self.db.execute("UPDATE tasks SET status='ready' WHERE id=?", (dependent,))
                    unblocked.append(dependent)
            self._event(now, "completed", actor.name, f"task {task_id}")
            self._changed()
            view = self._task_view(self._task(task_id))
            view["unblocked"] = unblocked
            return view

    def release_task(self, task_id: int, now: float) -> dict:
        with self.tx():
            task = self._task(task_id)
            if task["status"] != "claimed":
                raise ApiError(409, "task_not_claimed", f"task {task_id} is {task['status']}, not claimed")
            self.db.execute("UPDATE tasks SET status='ready', assignee_id=NULL, claimed_at=NULL WHERE id=?", (task_id,))
            self._event(now, "task_released", "operator", f"task {task_id}")
            self._changed()
            return self._task_view(self._task(task_id))

    # -- locks

    def _lock_view(self, row) -> dict:
        holder = self.peer_by_id(row["holder_id"])
        return {"path": row["display"], "abs_path": row["path"], "holder": holder["name"] if holder else None,
                "reason": row["reason"], "since": round(row["acquired_at"], 3)}

    def lock(self, peer, path: str, reason: str, now: float) -> dict:
        with self.tx():
            self._reap(now)
            self._touch(peer, now)
            if not peer["root"]:
                raise ApiError(400, "no_project_root", "join with a project root before locking files")
            real = resolve_lock_path(peer["root"], path)
            existing = self.db.execute("SELECT * FROM locks WHERE path=?", (real,)).fetchone()
            if existing is not None and existing["holder_id"] != peer["id"]:
                view = self._lock_view(existing)
                raise ApiError(409, "locked",
                               f"{view['path']} is locked by {view['holder']} ({view['reason'] or 'no reason given'}); "
                               "work on something else or message them", holder=view["holder"])
            display = os.path.relpath(real, os.path.realpath(peer["root"]))
            self.db.execute("INSERT OR REPLACE INTO locks(path, display, holder_id, reason, acquired_at) VALUES(?,?,?,?,?)",
                            (real, display, peer["id"], reason, existing["acquired_at"] if existing else now))
            self._changed()
            return self._lock_view(self.db.execute("SELECT * FROM locks WHERE path=?", (real,)).fetchone())

    def unlock(self, actor: Actor, path: str, now: float) -> dict:
        with self.tx():
            if actor.kind == "peer":
                if not actor.peer["root"]:
                    raise ApiError(400, "no_project_root", "join with a project root before unlocking files")
                real = resolve_lock_path(actor.peer["root"], path)
            else:
                real = os.path.realpath(path) if os.path.isabs(path) else path
            existing = self.db.execute("SELECT * FROM locks WHERE path=?", (real,)).fetchone()
            if existing is None:
                raise ApiError(404, "not_locked", f"{path} is not locked")
            if actor.kind == "peer" and existing["holder_id"] != actor.peer["id"]:
                raise ApiError(403, "not_lock_holder",
                               f"{existing['display']} is held by {self._lock_view(existing)['holder']}; only they or the human can unlock it")
            self.db.execute("DELETE FROM locks WHERE path=?", (real,))
            if actor.kind == "operator":
                self._event(now, "force_unlock", "operator", existing["display"])
            self._changed()
            return {"unlocked": existing["display"]}

    def list_locks(self) -> list:
        return [self._lock_view(r) for r in self.db.execute("SELECT * FROM locks ORDER BY path")]

    # -- memory

    def set_memory(self, actor: Actor, key: str, value: str, now: float) -> dict:
        with self.tx():
            exists = self.db.execute("SELECT 1 FROM memory WHERE key=?", (key,)).fetchone()
            if not exists and self.db.execute("SELECT COUNT(*) FROM memory").fetchone()[0] >= LIMITS["memory_keys"]:
                raise ApiError(507, "memory_full",
                               f"shared memory holds at most {LIMITS['memory_keys']} keys; overwrite an existing key")
            self.db.execute("INSERT OR REPLACE INTO memory(key, value, updated_by, updated_at) VALUES(?,?,?,?)",
                            (key, value, actor.name, now))
            self._changed()
        return {"key": key, "bytes": len(value.encode())}

    def get_memory(self, key) -> dict:
        if key is not None:
            row = self.db.execute("SELECT * FROM memory WHERE key=?", (key,)).fetchone()
            if row is None:
                keys = [r[0] for r in self.db.execute("SELECT key FROM memory ORDER BY key")]
                raise ApiError(404, "unknown_key", f"no memory key {key!r}; keys: {keys}")
            rows = [row]
        else:
            rows = self.db.execute("SELECT * FROM memory ORDER BY key").fetchall()
        return {"entries": [{"key": r["key"], "value": r["value"], "updated_by": r["updated_by"],
                             "updated_at": round(r["updated_at"], 3)} for r in rows]}

    # -- operator

    def set_room_state(self, state: str, now: float) -> dict:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO room(key, value) VALUES('state', ?)", (state,))
            if state == "running":
                self.db.execute("UPDATE peers SET status='left' WHERE status='kicked'")
            self._event(now, f"room_{state}", "operator", "")
            self._changed()
        self.room = state
        self.wake_everyone = True
        return {"room": state}

    def _live_peer(self, name: str, now: float):
        row = self.peer_by_name(name)
        if row is None or row["status"] != "active":
            raise ApiError(404, "unknown_peer", f"no peer named {name!r} is in the room")
        return row

    def kick(self, name: str, now: float) -> dict:
        with self.tx():
            row = self.peer_by_name(name)
            if row is None or row["status"] == "kicked":
                raise ApiError(404, "unknown_peer", f"no peer named {name!r} to kick")
            self._release_peer(row["id"], "kicked")
            self.db.execute("UPDATE peers SET generation=generation+1, role='worker' WHERE id=?", (row["id"],))
            self._event(now, "kicked", "operator", name)
        self.wake_everyone = True
        return {"kicked": name}

    def set_architect(self, name, now: float) -> dict:
        with self.tx():
            target = self._live_peer(name, now) if name is not None else None
            self.db.execute("UPDATE peers SET role='worker', generation=generation+1 WHERE role='architect'")
            if target is not None:
                self.db.execute("UPDATE peers SET role='architect', generation=generation+1 WHERE id=?", (target["id"],))
            self._event(now, "architect_seat", "operator", f"handed to {name}" if name else "revoked")
            self._changed()
        return {"architect": name}

    # -- events, retention, the dashboard's view

    def _event(self, now: float, kind: str, actor: str, detail: str) -> None:
        self.db.execute("INSERT INTO events(at, kind, actor, detail) VALUES(?,?,?,?)", (now, kind, actor, detail))

    def record_event(self, kind: str, actor: str, detail: str) -> None:
        with self.tx():
            self._event(time.time(), kind, actor, detail)

    def prune(self) -> None:
        """Keep retention bounded: old read messages go; unread ones stay until read."""
        with self.tx():
            top = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
            cut = top - self.settings.retention
            if cut > 0:
                self.db.execute("DELETE FROM deliveries WHERE acked=1 AND message_id <= ?", (cut,))
                self.db.execute("DELETE FROM messages WHERE id <= ? AND id NOT IN "
                                "(SELECT message_id FROM deliveries WHERE message_id <= ?)", (cut, cut))
            top_event = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            self.db.execute("DELETE FROM events WHERE id <= ?", (top_event - EVENTS_KEPT,))

    def snapshot(self, since, after_message: int, after_event: int, now: float) -> dict:
        view = {"version": self.version, "now": round(now, 3), "lease_seconds": self.settings.lease_seconds}
        architect = self._architect(now)
        view["room"] = {"state": self.room_state(), "architect": architect["name"] if architect else None}
        peers = self.db.execute("SELECT * FROM peers WHERE status != 'left' ORDER BY id").fetchall()
        view["peers"] = []
        for row in peers:
            entry = self.peer_view(row, now)
            entry["claims"] = [r[0] for r in self.db.execute(
                "SELECT id FROM tasks WHERE assignee_id=? AND status='claimed'", (row["id"],))]
            entry["locks"] = [r[0] for r in self.db.execute("SELECT display FROM locks WHERE holder_id=?", (row["id"],))]
            entry["unread"] = self.db.execute("SELECT COUNT(*) FROM deliveries WHERE peer_id=? AND acked=0",
                                              (row["id"],)).fetchone()[0]
            view["peers"].append(entry)
        if since != self.version:
            view["tasks"] = self.list_tasks(None)
            view["locks"] = self.list_locks()
            view["memory"] = self.get_memory(None)["entries"]
        rows = self.db.execute("SELECT * FROM messages WHERE id > ? ORDER BY id DESC LIMIT 200", (after_message,))
        view["messages"] = [self._message_view(r) for r in rows]
        view["open_blockers"] = self.db.execute(
            "SELECT COUNT(DISTINCT m.id) FROM messages m JOIN deliveries d ON d.message_id = m.id "
            "WHERE m.flagged=1 AND d.acked=0").fetchone()[0]
        events = self.db.execute("SELECT * FROM events WHERE id > ? ORDER BY id DESC LIMIT 200", (after_event,))
        view["events"] = [{"id": r["id"], "at": round(r["at"], 3), "kind": r["kind"], "actor": r["actor"],
                           "detail": r["detail"]} for r in events]
        return view

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


# ---------------------------------------------------------------- request validation (schema dicts)


@dataclass(frozen=True)
class Field:
    kind: str                 # text | name | target | enum | int | ids | texts | hex | name_or_null | token
    required: bool = False
    limit: int = 0            # max length (text), max items (lists), max value (int)
    minimum: int = 1          # min length (text) or min value (int)
    choices: tuple = ()
    default: object = None


IDENTITY_FIELDS = {"from", "sender", "sender_id", "sender_name", "from_peer", "peer_id", "as", "identity",
                   "author", "as_peer", "on_behalf_of", "from_role", "origin", "sender_role"}


def _refuse_longer(name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ApiError(400, "too_long", f"{name} is {len(text)} characters; the limit is {limit}")


def _check_text(field, name, value):
    if not isinstance(value, str):
        raise ApiError(400, "bad_type", f"{name} must be a string")
    _refuse_longer(name, value, field.limit)      # before spending the filter's time
    value = screen_text(name, value)
    _refuse_longer(name, value, field.limit)      # NFKC can lengthen text
    if field.minimum and not value.strip():
        raise ApiError(400, "too_short", f"{name} must not be empty")
    return value


def _check_name(field, name, value):
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ApiError(400, "bad_name", f"{name} must be 1-32 characters of letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
    return value


def _check_target(field, name, value):
    return "*" if value == "*" else _check_name(field, name, value)


def _check_enum(field, name, value):
    if value not in field.choices:
        raise ApiError(400, "bad_value", f"{name} must be one of {', '.join(field.choices)}")
    return value


def _check_int(field, name, value):
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,19}", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not field.minimum <= value <= field.limit:
        raise ApiError(400, "bad_value", f"{name} must be a whole number from {field.minimum} to {field.limit}")
    return value


def _check_ids(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} task ids")
    ids = [_check_int(Field("int", limit=2**53, minimum=1), name, v) for v in value]
    if len(set(ids)) != len(ids):
        raise ApiError(400, "duplicate_ids", f"{name} lists a task id twice")
    return ids


def _check_texts(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} strings")
    return [_check_text(Field("text", limit=LIMITS["path"]), name, v) for v in value]


def _check_hex(field, name, value):
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16,64}", value):
        raise ApiError(400, "bad_value", f"{name} must be 16-64 lowercase hex digits")
    return value


def _check_name_or_null(field, name, value):
    return None if value is None else _check_name(field, name, value)


def _check_token(field, name, value):
    if not isinstance(value, str) or len(value) > 512:
        raise ApiError(400, "bad_type", f"{name} must be a token string")
    return value


def _check_root(field, name, value):
    value = _check_text(field, name, value)
    if not os.path.isabs(value) or not os.path.isdir(value):
        raise ApiError(400, "bad_root", f"{name} must be the absolute path of an existing directory")
    return os.path.realpath(value)


CHECKS = {"text": _check_text, "name": _check_name, "target": _check_target, "enum": _check_enum,
          "int": _check_int, "ids": _check_ids, "texts": _check_texts, "hex": _check_hex,
          "name_or_null": _check_name_or_null, "token": _check_token, "root": _check_root}


def validate(schema: dict, data: dict) -> dict:
    for key in data:
        if key not in schema:
            if key in IDENTITY_FIELDS:
                raise ApiError(400, "identity_in_body",
                               f"'{key}' is not allowed: your identity comes from your token, never from the body")
            allowed = ", ".join(schema) or "no fields"
            raise ApiError(400, "unknown_field", f"unknown field '{key}'; this route accepts: {allowed}")
    clean = {}
    for key, field in schema.items():
        if key not in data or (data[key] is None and field.kind != "name_or_null"):
            if field.required:
                raise ApiError(400, "missing_field", f"'{key}' is required")
            clean[key] = field.default
        else:
            clean[key] = CHECKS[field.kind](field, key, data[key])
    return clean


# ---------------------------------------------------------------- routes


@dataclass
class Park:
    """A waiting inbox read: retried when the peer is woken, answered empty at the deadline."""
    peer_id: int
    deadline: float
    attempt: object           # attempt(final: bool) -> dict | None


@dataclass(frozen=True)
class Route:
    handler: object
    who: frozenset            # actor kinds allowed
    schema: dict
    architect: bool = False   # peers must hold the architect seat (the operator always may)


PEER = frozenset({"peer"})
PEER_OR_OPERATOR = frozenset({"peer", "operator"})
READERS = frozenset({"peer", "operator", "observer"})
INBOX_READERS = frozenset({"peer", "watch"})
OPERATOR = frozenset({"operator"})
OBSERVERS = frozenset({"operator", "observer"})
PUBLIC = frozenset({"public"})
JOINING = frozenset({"join"})


def r_health(broker, actor, q):
    answer = {"ok": True}
    if q["challenge"]:
        answer["proof"] = ctl_common.challenge_proof(broker.hmac_key, q["challenge"])
    return answer


def r_join(broker, actor, b):
    now = time.time()
    resumed = None
    if b["resume"]:
        claims = broker.signer.claims(b["resume"])
        resumed = claims[0] if claims and claims[3] == "session" else None
    peer = broker.store.join(b["name"], b["role"], b["summary"], b["root"], resumed, now)
    return {"token": broker.mint(peer, "session"), "watch_token": broker.mint(peer, "watch"),
            "name": peer["name"], "role": peer["role"], "lease_seconds": broker.settings.lease_seconds,
            "room": broker.store.room_state(),
            "peers": [p for p in broker.store.list_peers(now) if p["name"] != peer["name"]]}


def r_leave(broker, actor, b):
    broker.store.leave(actor.peer, time.time())
    return {"left": actor.name}


def r_heartbeat(broker, actor, b):
    return broker.store.heartbeat(actor.peer, b["summary"], time.time())


def r_peers(broker, actor, q):
    return {"peers": broker.store.list_peers(time.time())}


def r_send(broker, actor, b):
    return broker.store.send(actor, b["to"], b["content"], b["category"], time.time())


def r_inbox(broker, actor, q):
    peer_id = actor.peer["id"]

    def attempt(final):
        batch = broker.store.inbox(peer_id, q["limit"])
        return batch if batch["messages"] or final or batch["room"] == "stopped" else None

    found = attempt(final=q["wait"] == 0)
    if found is not None:
        return found
    return Park(peer_id, time.monotonic() + q["wait"], attempt)


def r_ack(broker, actor, b):
    return broker.store.ack(actor.peer["id"], b["ids"])


def r_create_task(broker, actor, b):
    return broker.store.create_task(actor, b["title"], b["description"], b["depends_on"], time.time())


def r_update_task(broker, actor, b):
    fields = {k: v for k, v in b.items() if k != "task_id" and v is not None}
    return broker.store.update_task(b["task_id"], fields, time.time())


def r_tasks(broker, actor, q):
    return broker.store.list_tasks(q["status"])


def r_claim(broker, actor, b):
    return broker.store.claim(actor.peer, b["task_id"], time.time())


def r_complete(broker, actor, b):
    return broker.store.complete(actor, b["task_id"], b["summary"], b["files"], time.time())


def r_lock(broker, actor, b):
    return broker.store.lock(actor.peer, b["path"], b["reason"], time.time())


def r_unlock(broker, actor, b):
    return broker.store.unlock(actor, b["path"], time.time())


def r_locks(broker, actor, q):
    return {"locks": broker.store.list_locks()}


def r_set_memory(broker, actor, b):
    return broker.store.set_memory(actor, b["key"], b["value"], time.time())


def r_get_memory(broker, actor, q):
    return broker.store.get_memory(q["key"])


def r_state(broker, actor, q):
    view = broker.store.snapshot(q["since"], q["after_message"], q["after_event"], time.time())
    view["health"] = broker.health()
    view["viewer"] = actor.kind
    return view


def r_room(state):
    return lambda broker, actor, b: broker.store.set_room_state(state, time.time())


def r_kick(broker, actor, b):
    return broker.store.kick(b["name"], time.time())


def r_inject(broker, actor, b):
    return broker.store.send(actor, b["to"], b["content"], b["category"], time.time())


def r_release(broker, actor, b):
    return broker.store.release_task(b["task_id"], time.time())


def r_architect(broker, actor, b):
    return broker.store.set_architect(b["name"], time.time())


TASK_ID = Field("int", required=True, limit=2**53)
SEND_SCHEMA = {"to": Field("target", required=True),
               "content": Field("text", required=True, limit=LIMITS["content"]),
               "category": Field("enum", choices=CATEGORIES, default="info")}

ROUTES = {
    ("GET", "/health"): Route(r_health, PUBLIC, {"challenge": Field("hex")}),
    ("POST", "/join"): Route(r_join, JOINING, {
        "name": Field("name", required=True),
        "role": Field("enum", choices=("worker", "architect")),
        "summary": Field("text", limit=LIMITS["summary"], minimum=0, default=""),
        "root": Field("root", limit=LIMITS["path"]),
        "resume": Field("token")}),
    ("POST", "/leave"): Route(r_leave, PEER, {}),
    ("POST", "/heartbeat"): Route(r_heartbeat, PEER, {"summary": Field("text", limit=LIMITS["summary"], minimum=0)}),
    ("GET", "/peers"): Route(r_peers, READERS, {}),
    ("POST", "/messages"): Route(r_send, PEER, SEND_SCHEMA),
    ("GET", "/inbox"): Route(r_inbox, INBOX_READERS, {
        "wait": Field("int", limit=MAX_WAIT_SECONDS, minimum=0, default=0),
        "limit": Field("int", limit=100, default=20)}),
    ("POST", "/inbox/ack"): Route(r_ack, INBOX_READERS, {"ids": Field("ids", required=True, limit=100)}),
    ("POST", "/tasks"): Route(r_create_task, PEER_OR_OPERATOR, {
        "title": Field("text", required=True, limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0, default=""),
        "depends_on": Field("ids", limit=LIMITS["depends_on"], default=[])}, architect=True),
    ("POST", "/tasks/update"): Route(r_update_task, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "title": Field("text", limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0),
        "depends_on": Field("ids", limit=LIMITS["depends_on"])}, architect=True),
    ("GET", "/tasks"): Route(r_tasks, READERS, {"status": Field("enum", choices=TASK_STATUSES)}),
    ("POST", "/tasks/claim"): Route(r_claim, PEER, {"task_id": Field("int", limit=2**53)}),
    ("POST", "/tasks/complete"): Route(r_complete, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "summary": Field("text", required=True, limit=LIMITS["summary"]),
        "files": Field("texts", limit=LIMITS["files"], default=[])}),
    ("POST", "/locks"): Route(r_lock, PEER, {
        "path": Field("text", required=True, limit=LIMITS["path"]),
        "reason": Field("text", limit=LIMITS["reason"], minimum=0, default="")}),
    ("POST", "/locks/release"): Route(r_unlock, PEER_OR_OPERATOR, {
        "path": Field("text", required=True, limit=LIMITS["path"])}),
    ("GET", "/locks"): Route(r_locks, READERS, {}),
    ("POST", "/memory"): Route(r_set_memory, PEER_OR_OPERATOR, {
        "key": Field("text", required=True, limit=LIMITS["mem_key"]),
        "value": Field("text", required=True, limit=LIMITS["mem_value"])}, architect=True),
    ("GET", "/memory"): Route(r_get_memory, READERS, {"key": Field("text", limit=LIMITS["mem_key"])}),
    ("GET", "/state"): Route(r_state, OBSERVERS, {
        "since": Field("int", limit=2**62, minimum=0),
        "after_message": Field("int", limit=2**62, minimum=0, default=0),
        "after_event": Field("int", limit=2**62, minimum=0, default=0)}),
    ("POST", "/operator/pause"): Route(r_room("paused"), OPERATOR, {}),
    ("POST", "/operator/resume"): Route(r_room("running"), OPERATOR, {}),
    ("POST", "/operator/stop"): Route(r_room("stopped"), OPERATOR, {}),
    ("POST", "/operator/reset"): Route(r_room("running"), OPERATOR, {}),
    ("POST", "/operator/kick"): Route(r_kick, OPERATOR, {"name": Field("name", required=True)}),
    ("POST", "/operator/inject"): Route(r_inject, OPERATOR, SEND_SCHEMA),
    ("POST", "/operator/unlock"): Route(r_unlock, OPERATOR, {"path": Field("text", required=True, limit=4096)}),
    ("POST", "/operator/release"): Route(r_release, OPERATOR, {"task_id": TASK_ID}),
    ("POST", "/operator/architect"): Route(r_architect, OPERATOR, {"name": Field("name_or_null", required=True)}),
}
ROUTE_METHODS = {}
for _method, _path in ROUTES:
    ROUTE_METHODS.setdefault(_path, []).append(_method)


# ---------------------------------------------------------------- the front door and auth


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict             # lower-case field name -> value
    body: bytes
    client: str


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


_JSON_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_json", "body must be UTF-8 JSON")
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise ApiError(400, "too_deep", f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise ApiError(400, "duplicate_key", f"JSON object repeats the key {str(exc)[:64]!r}")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {str(exc)[:120]}")
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return data


def parse_query(query: str) -> dict:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       max_num_fields=16, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_query", "query string is malformed")
    data = {}
    for key, value in pairs:
        if key in data:
            raise ApiError(400, "bad_query", f"query parameter {key!r} is repeated")
        data[key] = value
    return data


def escape_for_log(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


class Broker:
    """HTTP semantics around the store: the gate, authentication, validation, routing, JSON errors."""

    def __init__(self, state_dir: str, port: int, host: str, settings: Settings):
        self.state_dir, self.port, self.settings = state_dir, port, settings
        self.hmac_key = ctl_common.read_secret(state_dir, ctl_common.HMAC_KEY_FILE, create=True)
        self.join_secret = ctl_common.read_secret(state_dir, ctl_common.JOIN_SECRET_FILE, create=True).encode()
        self.operator_token = ctl_common.read_secret(state_dir, ctl_common.OPERATOR_TOKEN_FILE, create=True).encode()
        self.signer = TokenSigner(self.hmac_key)
        db_path = os.path.join(state_dir, "broker.db")
        for suffix in ("", "-wal", "-shm"):
            ctl_common.check_private_file(db_path + suffix)
        self.store = Store(db_path, settings)
        self.allowed_hosts = {f"{host}:{port}", f"localhost:{port}"}
        self.allowed_origins = {f"http://{h}" for h in self.allowed_hosts}
        self.started = time.time()
        self.next_prune = self.started + PRUNE_EVERY
        self.connections = 0
        self.static_pages = self._static_pages()

    def _static_pages(self) -> dict:
        """GET responses that carry no data, so they need no token: path -> (status, body, headers)."""
        dashboard = self._load_dashboard()
        if dashboard is None:
            page = (404, {"error": {"code": "no_dashboard", "message": "dashboard.html is missing next to broker.py"}}, {})
        else:
            page = (200, dashboard[0], {"Content-Type": "text/html; charset=utf-8",
                                        "Content-Security-Policy": dashboard[1]})
        return {"/": page, "/dashboard.html": page, "/favicon.ico": (204, b"", {})}

    def _load_dashboard(self):
        beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html")
        installed = os.path.join(sys.prefix, "share", "control-tower-lite", "dashboard.html")
        for path in (beside, installed):
            try:
                with open(path, "rb") as handle:
                    page = handle.read()
                break
            except OSError:
                continue
        else:
            return None
        text = page.decode("utf-8")

        def allowed(tag: str) -> str:
            """The page's own inline blocks, by hash: nothing else may run or style it."""
            digests = [b64encode(hashlib.sha256(body.encode()).digest()).decode()
                       for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)]
            return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

        csp = (f"default-src 'none'; script-src {allowed('script')}; style-src {allowed('style')}; "
               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return page, csp

    def mint(self, peer, scope: str) -> str:
        return self.signer.mint(peer["id"], peer["generation"], peer["role"], scope,
                                int(time.time()) + self.settings.token_ttl)

    def health(self) -> dict:
        db_path = os.path.join(self.state_dir, "broker.db")
        size = sum(os.path.getsize(db_path + s) for s in ("", "-wal") if os.path.exists(db_path + s))
        return {"uptime": round(time.time() - self.started, 1), "connections": self.connections,
                "db_bytes": size, "port": self.port}

    def gate(self, req: Request) -> None:
        """Checks that come before routing, on every request, whoever asks."""
        host = req.headers.get("host")
        if host is None:
            raise ApiError(400, "missing_host", "a Host header is required")
        if host.lower() not in self.allowed_hosts:
            raise ApiError(421, "wrong_host", f"Host must be one of {sorted(self.allowed_hosts)}")
        origin = req.headers.get("origin")
        if origin is not None and origin.lower() not in self.allowed_origins:
            raise ApiError(403, "foreign_origin", "requests from other origins are refused")
        fetch_site = req.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
            raise ApiError(403, "cross_site", "cross-site requests are refused")

    def authenticate(self, req: Request, route: Route) -> Actor:
        if route.who == PUBLIC:
            return Actor("public")
        header = req.headers.get("authorization", "")
        if not header.startswith("Bearer ") or len(header) > 600:
            raise ApiError(401, "missing_token", "send 'Authorization: Bearer <token>'; join first to get one")
        presented = header[7:].strip().encode("utf-8", "replace")
        if route.who == JOINING:
            if not hmac.compare_digest(presented, self.join_secret):
                raise ApiError(401, "bad_join_secret", "join needs the join secret from the state directory")
            return Actor("join")
        if hmac.compare_digest(presented, self.operator_token):
            actor = Actor("operator")
        else:
            actor = self._token_actor(presented.decode("utf-8", "replace"))
        if actor.kind not in route.who:
            raise ApiError(403, "forbidden", f"{actor.kind} tokens may not call {req.method} {req.path}")
        if route.architect and actor.kind == "peer" and actor.role != "architect":
            raise ApiError(403, "architect_only",
                           "only the architect may do this; ask the architect, e.g. with send")
        return actor

    def _token_actor(self, token: str) -> Actor:
        claims = self.signer.claims(token)
        if claims is None:
            raise ApiError(401, "bad_token", "token is invalid; rejoin to get a new one")
        peer_id, generation, role, scope, expires = claims
        if scope == "observe":
            return Actor("observer")
        if expires < time.time():
            raise ApiError(401, "token_expired", "token expired; rejoin to get a new one")
        peer = self.store.peer_by_id(peer_id)
        if peer is None:
            raise ApiError(401, "bad_token", "token names no peer; rejoin")
        if peer["status"] == "kicked":
            raise ApiError(401, "kicked", "the operator removed you from the room; stop and ask the human")
        if peer["generation"] != generation or peer["role"] != role:
            raise ApiError(401, "token_superseded",
                           "token was superseded (rejoin, role change or name takeover); rejoin")
        if peer["status"] == "left":
            raise ApiError(401, "left", "you left the room; join again")
        return Actor("watch" if scope == "watch" else "peer", peer)

    def handle(self, req: Request):
        """Return (status, body, extra headers) or a Park; never raise."""
        actor = None
        try:
            self.gate(req)
            if req.method == "GET" and req.path in self.static_pages:
                return self.static_pages[req.path]
            route = ROUTES.get((req.method, req.path))
            if route is None:
                if req.path in ROUTE_METHODS:
                    raise ApiError(405, "method_not_allowed",
                                   f"{req.path} accepts {', '.join(ROUTE_METHODS[req.path])}")
                raise ApiError(404, "no_route", f"no route {req.path}; see the README's HTTP API section")
            if req.method == "POST":
                ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ApiError(415, "unsupported_media_type", "POST bodies must be Content-Type: application/json")
                data = parse_json_object(req.body)
            else:
                if req.body:
                    raise ApiError(400, "unexpected_body", "GET requests carry no body; use the query string")
                data = parse_query(req.query)
            actor = self.authenticate(req, route)
            params = validate(route.schema, data)
            result = route.handler(self, actor, params)
            return result if isinstance(result, Park) else (200, result, self._room_header(actor))
        except ApiError as err:
            self._note_refusal(err, actor, req)
            return err.status, err.body(), self._room_header(actor)
        except sqlite3.OperationalError as exc:
            log(f"storage error on {req.method} {escape_for_log(req.path)}: {exc}")
            return 503, {"error": {"code": "storage_unavailable", "message": "storage is busy or full; retry shortly"}}
        except Exception:
            log(f"internal error on {req.method} {escape_for_log(req.path)}:\n{traceback.format_exc()}")
            return 500, {"error": {"code": "internal", "message": "internal error; see the broker log"}}

    def _room_header(self, actor) -> dict:
        """Sessions learn of a pause or stop on their very next call, whatever it was."""
        if actor is None or actor.kind not in ("peer", "watch"):
            return {}
        return {"X-CTL-Room": self.store.room_state()}

    SECURITY_EVENTS = {401: "auth_failed", 403: "forbidden", 421: "wrong_host", 422: "content_filtered",
                       429: "rate_limited"}

    def _note_refusal(self, err: ApiError, actor, req: Request) -> None:
        kind = self.SECURITY_EVENTS.get(err.status)
        if kind is None:
            return
        who = actor.name if actor is not None and actor.kind not in ("join", "public") else f"client {req.client}"
        detail = f"{req.method} {escape_for_log(req.path)}: {err.code}"
        if "rule" in err.extra:
            detail += f" (rule {err.extra['rule']} on {err.extra['field']})"
        try:
            self.store.record_event(kind, who, detail)
        except sqlite3.Error:
            pass

    def tick(self) -> None:
        """Once a second from the loop: leases and retention. Errors are logged, never fatal."""
        now = time.time()
        try:
            if self.store.reap(now):
                self.store.wake_everyone = True
            if now >= self.next_prune:
                self.next_prune = now + PRUNE_EVERY
                self.store.prune()
        except sqlite3.Error as exc:
            log(f"tick failed (will retry): {exc}")


# ---------------------------------------------------------------- HTTP over one selectors loop


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} broker: {message}\n")
    sys.stderr.flush()


class Connection:
    __slots__ = ("sock", "client", "inbuf", "outbuf", "request_deadline", "idle_deadline", "write_deadline",
                 "park", "close_after", "keep_alive")

    def __init__(self, sock, client: str, now: float):
        self.sock, self.client = sock, client
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.request_deadline = None
        self.idle_deadline = now + IDLE_TIMEOUT
        self.write_deadline = None
        self.park = None
        self.close_after = False
        self.keep_alive = True


class IncompleteRequest(Exception):
    pass


HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
SINGLE_HEADERS = {"host", "content-length", "content-type", "authorization", "origin", "transfer-encoding"}
MAX_HEADERS = 100


def parse_header_fields(block: bytes) -> dict:
    """Header fields as {lower-case name: value}, strictly: no folding, no repeats of the ones that matter.

    Written here rather than borrowed from http.client, whose email-based parser cost a sixth of a
    millisecond per request under cProfile (see bench/NOTES.md).
    """
    fields = {}
    lines = block.split(b"\r\n") if block else []
    if len(lines) > MAX_HEADERS:
        raise ApiError(400, "bad_headers", f"more than {MAX_HEADERS} header fields")
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not HEADER_NAME.fullmatch(name):
            raise ApiError(400, "bad_headers", "malformed header field (or a folded line)")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in fields:
            if key in SINGLE_HEADERS:
                raise ApiError(400, "repeated_header", f"the {name.decode('ascii')} header is given more than once")
            text = f"{fields[key]}, {text}"
        fields[key] = text
    return fields


class HttpLoop:
    def __init__(self, broker: Broker, host: str, port: int, verbose: bool = False):
        self.broker, self.verbose = broker, verbose
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.connections = set()
        self.running = True

    def serve_forever(self) -> None:
        next_tick = next_expiry = 0.0
        while self.running:
            for key, mask in self.selector.select(0.05):
                if key.data is None:
                    self._accept()
                    continue
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ and conn in self.connections:
                    self._read(conn)
            now = time.monotonic()
            if now >= next_expiry:          # deadlines are coarse: no need to scan every socket per request
                next_expiry = now + 0.05
                self._expire(now)
            if now >= next_tick:
                next_tick = now + 1.0
                self.broker.tick()
            self._wake_parked()
        for conn in list(self.connections):
            self._close(conn)
        self.selector.close()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log("out of file descriptors; refusing connections for now")
                return
            if len(self.connections) >= self.broker.settings.max_connections:
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, f"{address[0]}:{address[1]}", time.monotonic())
            self.connections.add(conn)
            self.broker.connections = len(self.connections)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.broker.connections = len(self.connections)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        if len(conn.inbuf) > MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096 and (conn.park or conn.outbuf):
            self._close(conn)
            return
        if conn.request_deadline is None:
            conn.request_deadline = time.monotonic() + REQUEST_TIMEOUT
        self._advance(conn)

    def _advance(self, conn: Connection) -> None:
        """Handle every complete request buffered on the connection, one at a time, in order."""
        while conn in self.connections and not conn.park and not conn.outbuf and not conn.close_after and conn.inbuf:
            try:
                req = self._parse(conn)
            except IncompleteRequest:
                return
            except ApiError as err:
                conn.keep_alive = False
                self._respond(conn, err.status, err.body())
                return
            conn.request_deadline = time.monotonic() + REQUEST_TIMEOUT if conn.inbuf else None
            started = time.perf_counter()
            outcome = self.broker.handle(req)
            if isinstance(outcome, Park):
                conn.park = outcome
                continue
            self._wake_parked()             # the recipient hears first; the sender's answer follows
            self._respond(conn, *outcome)
            if self.verbose or outcome[0] >= 400:
                log(f"{req.client} {req.method} {escape_for_log(req.path)} -> {outcome[0]} "
                    f"({(time.perf_counter() - started) * 1000:.1f} ms)")

    def _parse(self, conn: Connection) -> Request:
        buf = conn.inbuf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise ApiError(431, "head_too_large", f"request head exceeds {MAX_HEAD_BYTES} bytes")
            raise IncompleteRequest()
        if end > MAX_HEAD_BYTES:
            raise ApiError(431, "head_too_large", f"request head exceeds {MAX_HEAD_BYTES} bytes")
        head = bytes(buf[:end + 4])
        line_end = head.find(b"\r\n")
        try:
            method, target, version = head[:line_end].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "bad_request_line", "malformed request line")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise ApiError(505, "http_version", "only HTTP/1.0 and HTTP/1.1 are spoken here")
        if not target.startswith("/"):
            raise ApiError(400, "bad_target", "request target must be a path")
        headers = parse_header_fields(head[line_end + 2:end])
        if "transfer-encoding" in headers:
            raise ApiError(400, "transfer_encoding", "Transfer-Encoding is not accepted; send Content-Length")
        length = 0
        if "content-length" in headers:
            if not re.fullmatch(r"\d{1,10}", headers["content-length"]):
                raise ApiError(400, "bad_content_length", "Content-Length must be a number")
            length = int(headers["content-length"])
        elif method == "POST":
            raise ApiError(411, "length_required", "POST needs a Content-Length")
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
        total = end + 4 + length
        if len(buf) < total:
            raise IncompleteRequest()
        body = bytes(buf[end + 4:total])
        del buf[:total]
        connection = headers.get("connection", "").lower()
        conn.keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        path, _, query = target.partition("?")
        return Request(method, urllib.parse.unquote(path), query, headers, body, conn.client)

    def _respond(self, conn: Connection, status: int, body, extra_headers=None) -> None:
        if isinstance(body, dict):
            payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            content_type = "application/json"
        else:
            payload, content_type = body, None
        headers = {"Content-Type": content_type, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
        headers.update(extra_headers or {})
        if status == 429:
            headers["Retry-After"] = str(body["error"].get("retry_after", 60))
        if status == 405:
            headers["Allow"] = "GET, POST"
        close = not conn.keep_alive or status in (400, 408, 411, 413, 431, 505)
        headers["Connection"] = "close" if close else "keep-alive"
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
        lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
        conn.outbuf += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        conn.close_after = close
        conn.idle_deadline = time.monotonic() + IDLE_TIMEOUT
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        try:
            sent = conn.sock.send(conn.outbuf) if conn.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if conn.outbuf:
            if conn.write_deadline is None:
                conn.write_deadline = time.monotonic() + WRITE_TIMEOUT
                self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return
        if conn.write_deadline is not None:
            conn.write_deadline = None
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.close_after:
            self._close(conn)
        elif conn.inbuf:
            self._advance(conn)

    def _expire(self, now: float) -> None:
        for conn in list(self.connections):
            if conn.park is not None:
                if now >= conn.park.deadline:
                    self._finish_park(conn, final=True)
            elif conn.write_deadline is not None and now >= conn.write_deadline:
                self._close(conn)
            elif conn.request_deadline is not None and now >= conn.request_deadline:
                conn.keep_alive = False
                self._respond(conn, 408, {"error": {"code": "request_timeout",
                                                    "message": f"request not received within {REQUEST_TIMEOUT:.0f}s"}})
            elif conn.request_deadline is None and not conn.outbuf and now >= conn.idle_deadline:
                self._close(conn)

    def _wake_parked(self) -> None:
        store = self.broker.store
        if not store.woken and not store.wake_everyone:
            return
        woken, everyone = store.woken, store.wake_everyone
        store.woken, store.wake_everyone = set(), False
        for conn in list(self.connections):
            if conn.park is not None and (everyone or conn.park.peer_id in woken):
                self._finish_park(conn, final=False)

    def _finish_park(self, conn: Connection, final: bool) -> None:
        try:
            result = conn.park.attempt(final)
        except Exception:
            log(f"waiting read failed:\n{traceback.format_exc()}")
            result = {"error": {"code": "internal", "message": "internal error; see the broker log"}}
            conn.park = None
            self._respond(conn, 500, result)
            return
        if result is None:
            return
        conn.park = None
        self._respond(conn, 200, result)
        self._advance(conn)


# ---------------------------------------------------------------- running it


def require_loopback(host: str) -> str:
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise StateError(f"cannot resolve host {host!r}")
    if not address.is_loopback or address.version != 4:
        raise StateError(f"refusing to bind {host}: the broker only listens on an IPv4 loopback address")
    return str(address)


def hold_state_lock(state_dir: str):
    """One broker per state directory: a second one would fight the first over the same database."""
    path = os.path.join(state_dir, "broker.pid")
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        other = handle.read().strip() or "unknown"
        raise StateError(f"another broker ({other}) already uses {state_dir}; stop it or use another --state-dir")
    return handle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Control Tower Lite broker (localhost only)")
    ctl_common.add_location_args(parser)
    parser.add_argument("--host", default=ctl_common.HOST, help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true", help="log every request, not only refusals")
    args = parser.parse_args(argv)
    os.umask(0o077)
    try:
        settings = Settings.from_env()
        port = ctl_common.resolve_port(args.port)
        host = require_loopback(args.host)
        state_dir = ctl_common.ensure_state_dir(ctl_common.resolve_state_dir(args.state_dir))
        lock = hold_state_lock(state_dir)
        broker = Broker(state_dir, port, host, settings)
        try:
            loop = HttpLoop(broker, host, port, verbose=args.verbose)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StateError(f"port {port} is in use: is a broker already running (python launch.py --status)? "
                                 "or choose another with --port / CTL_PORT")
            raise
    except (StateError, sqlite3.Error, OSError) as exc:
        sys.stderr.write(f"broker: {exc}\n")
        return 2
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} port {port}")
    lock.flush()

    def stop(signum, frame):
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on http://{host}:{port}/ (state {state_dir}, pid {os.getpid()})")
    try:
        loop.serve_forever()
    finally:
        broker.store.close()
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
