"""Storage and rules: every rule of a room, each operation one SQLite transaction (WAL, synchronous=FULL).

Nothing here knows about HTTP; routes in api.py call these methods with validated arguments.
"""
import contextlib
import json
import os
import sqlite3
import time
from collections import deque
from dataclasses import dataclass

from ctl.config import EVENTS_KEPT, LIMITS, TASK_STATUSES, Settings
from ctl.errors import ApiError
from ctl.names import RESERVED_SKELETONS, name_skeleton


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
