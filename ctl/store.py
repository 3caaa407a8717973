"""Storage and rules: every rule of every room, each operation one SQLite transaction (WAL, synchronous=FULL).

A room is one project's team: its peers, messages, task graph, locks, memory, seat and pause/stop
state. Every query below names its room; nothing of one room is reachable from another.
Nothing here knows about HTTP; routes in api.py call these methods with validated arguments.
"""
import contextlib
import itertools
import json
import os
import sqlite3
import time
from collections import deque
from dataclasses import dataclass

from ctl.config import BUSY_WAIT_MS, BUSY_WINDOW, GONE_PEER_DAYS, LIMITS, Settings
from ctl.common import StateError
from ctl.errors import ApiError
from ctl.locks import Locks
from ctl.mail import Mail
from ctl.marks import flags_json, with_flags
from ctl.memory import Memory
from ctl.names import name_skeleton, reads_as_authority
from ctl.retention import Retention
from ctl.tasks import Tasks

SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE rooms(
  id INTEGER PRIMARY KEY, key TEXT NOT NULL, name TEXT NOT NULL, root TEXT,
  state TEXT NOT NULL DEFAULT 'running', created_at REAL NOT NULL, archived_at REAL, seat_peer INTEGER,
  wake TEXT NOT NULL DEFAULT 'on');
CREATE UNIQUE INDEX rooms_open_key ON rooms(key) WHERE archived_at IS NULL;
CREATE UNIQUE INDEX rooms_open_name ON rooms(name) WHERE archived_at IS NULL;
CREATE TABLE peers(
  id INTEGER PRIMARY KEY, room_id INTEGER NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL,
  generation INTEGER NOT NULL, status TEXT NOT NULL, summary TEXT NOT NULL DEFAULT '', root TEXT,
  joined_at REAL NOT NULL, last_seen REAL NOT NULL, last_read REAL, reach TEXT NOT NULL DEFAULT 'tool',
  agent TEXT, flags TEXT, UNIQUE(room_id, name));
CREATE TABLE messages(
  id INTEGER PRIMARY KEY, room_id INTEGER NOT NULL, sender TEXT NOT NULL, sender_role TEXT NOT NULL,
  origin TEXT NOT NULL, recipient TEXT NOT NULL, category TEXT NOT NULL, content TEXT NOT NULL,
  created_at REAL NOT NULL, flag TEXT);
CREATE INDEX messages_room ON messages(room_id, id);
CREATE INDEX messages_blockers ON messages(room_id, id) WHERE category = 'blocker';
CREATE TABLE deliveries(
  id INTEGER PRIMARY KEY, peer_id INTEGER NOT NULL, message_id INTEGER NOT NULL, acked_at REAL);
CREATE INDEX deliveries_unread ON deliveries(peer_id, id) WHERE acked_at IS NULL;
CREATE INDEX deliveries_message ON deliveries(message_id);
CREATE TABLE tasks(
  room_id INTEGER NOT NULL, id INTEGER NOT NULL, title TEXT NOT NULL, description TEXT NOT NULL,
  status TEXT NOT NULL, created_by TEXT NOT NULL, created_at REAL NOT NULL, assignee_id INTEGER,
  claimed_at REAL, done_by TEXT, done_at REAL, summary TEXT, files TEXT, history TEXT NOT NULL DEFAULT '[]',
  flags TEXT, PRIMARY KEY(room_id, id));
CREATE INDEX tasks_status ON tasks(room_id, status, id);
CREATE INDEX tasks_assignee ON tasks(assignee_id) WHERE assignee_id IS NOT NULL;
CREATE INDEX tasks_done ON tasks(room_id, done_at) WHERE status = 'done';
CREATE TABLE task_deps(
  room_id INTEGER NOT NULL, task_id INTEGER NOT NULL, depends_on INTEGER NOT NULL,
  PRIMARY KEY(room_id, task_id, depends_on));
CREATE INDEX task_deps_reverse ON task_deps(room_id, depends_on);
CREATE TABLE locks(
  room_id INTEGER NOT NULL, path TEXT NOT NULL, display TEXT NOT NULL, holder_id INTEGER NOT NULL,
  reason TEXT NOT NULL, acquired_at REAL NOT NULL, flags TEXT, PRIMARY KEY(room_id, path));
CREATE INDEX locks_holder ON locks(holder_id);
CREATE TABLE memory(
  room_id INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated_by TEXT NOT NULL,
  updated_at REAL NOT NULL, flags TEXT, PRIMARY KEY(room_id, key));
CREATE TABLE events(
  id INTEGER PRIMARY KEY, room_id INTEGER, at REAL NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL,
  detail TEXT NOT NULL, count INTEGER NOT NULL DEFAULT 1);
CREATE INDEX events_room ON events(room_id, id);
"""
SEAT_REVOKED = 0        # rooms.seat_peer: NULL never had an architect, 0 revoked or vacated, else the holder's peer id


# ---------------------------------------------------------------- opening, versions, migrations


def _migrate_v1(db) -> None:
    """v1 held one machine-wide room: it becomes one room, named after the project its peers used."""
    roots = db.execute("SELECT root, COUNT(*) AS n FROM peers WHERE root IS NOT NULL GROUP BY root "
                       "ORDER BY n DESC, root").fetchall()
    root = roots[0][0] if roots else None
    name = room_name_for(root) if root else "default"
    state_row = db.execute("SELECT value FROM room WHERE key='state'").fetchone()
    seat = db.execute("SELECT id FROM peers WHERE role='architect' ORDER BY last_seen DESC").fetchone()
    for table in ("peers", "messages", "deliveries", "tasks", "task_deps", "locks", "memory", "events", "room"):
        db.execute(f"ALTER TABLE {table} RENAME TO v1_{table}")
    for index in [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")]:
        db.execute(f"DROP INDEX {index}")
    db.executescript_statements(SCHEMA)
    db.execute("INSERT INTO rooms(id, key, name, root, state, seat_peer, created_at) VALUES(1,?,?,?,?,?,?)",
               (f"root:{root}" if root else "name:default", name, root,
                state_row[0] if state_row else "running", seat[0] if seat else None, time.time()))
    db.execute("INSERT INTO peers SELECT id, 1, name, role, generation, status, summary, root, joined_at, "
               "last_seen, NULL, 'tool', NULL, NULL FROM v1_peers")
    db.execute("INSERT INTO messages SELECT id, 1, sender, sender_role, origin, recipient, category, content, "
               "created_at, NULL FROM v1_messages")
    db.execute("INSERT INTO deliveries SELECT d.id, d.peer_id, d.message_id, "
               "CASE WHEN d.acked THEN m.created_at END FROM v1_deliveries d "
               "LEFT JOIN v1_messages m ON m.id = d.message_id")
    db.execute("INSERT INTO tasks SELECT 1, id, title, description, status, created_by, created_at, assignee_id, "
               "claimed_at, done_by, done_at, summary, files, '[]', NULL FROM v1_tasks")
    db.execute("INSERT INTO task_deps SELECT 1, task_id, depends_on FROM v1_task_deps")
    db.execute("INSERT INTO locks SELECT 1, path, display, holder_id, reason, acquired_at, NULL FROM v1_locks")
    db.execute("INSERT INTO memory SELECT 1, key, value, updated_by, updated_at, NULL FROM v1_memory")
    db.execute("INSERT INTO events SELECT id, 1, at, kind, actor, detail, 1 FROM v1_events")
    for table in ("peers", "messages", "deliveries", "tasks", "task_deps", "locks", "memory", "events", "room"):
        db.execute(f"DROP TABLE v1_{table}")


def _migrate_v2(db) -> None:
    """v2 gave the architect seat to a name, which anyone could take once its holder died: v3 gives it to the
    holder's peer row, whose current token only its own session has. Kicks also remember the agent process."""
    if "seat_peer" in {r[1] for r in db.execute("PRAGMA table_info(rooms)")}:
        return                          # made by _migrate_v1, which writes the newest schema
    db.execute("ALTER TABLE peers ADD COLUMN agent TEXT")
    db.execute("ALTER TABLE rooms ADD COLUMN seat_peer INTEGER")
    db.execute("UPDATE rooms SET seat_peer = CASE WHEN seat IS NULL THEN NULL WHEN seat = '' THEN 0 ELSE "
               "COALESCE((SELECT id FROM peers p WHERE p.room_id = rooms.id AND p.name = rooms.seat), 0) END")
    db.execute("ALTER TABLE rooms DROP COLUMN seat")


def _migrate_v3(db) -> None:
    """v4: whether idle sessions of a room are woken (hook.py Wait), set by the human per room."""
    if "wake" not in {r[1] for r in db.execute("PRAGMA table_info(rooms)")}:
        db.execute("ALTER TABLE rooms ADD COLUMN wake TEXT NOT NULL DEFAULT 'on'")


def _migrate_v4(db) -> None:
    """v5: what the content filter flagged in a task's, a lock's, a memory entry's or a peer's own text, so
    whoever reads it later sees the mark, as with a message."""
    for table in ("peers", "tasks", "locks", "memory"):
        if "flags" not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN flags TEXT")


MIGRATIONS = {1: _migrate_v1, 2: _migrate_v2, 3: _migrate_v3, 4: _migrate_v4}   # from version N to N+1; a v1 database has user_version 0 and a `room` table


class _Script:
    """sqlite3's executescript commits first; migrations must stay inside their one transaction."""

    def __init__(self, db):
        self.db = db

    def execute(self, *args):
        return self.db.execute(*args)

    def executescript_statements(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.db.execute(statement)


def open_database(path: str) -> sqlite3.Connection:
    """Open, create or migrate the database; refuse one from a newer version of the code."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA busy_timeout={BUSY_WAIT_MS}")    # another process's write lock costs us 20 ms, not 5 s
    # The WAL is reused from its start after every checkpoint and never truncated: a commit that overwrites
    # frames fsyncs no file-size change, which took a quarter off a commit's kernel time on ext4 (bench/NOTES.md). So
    # the checkpoint (under load; the loop also checkpoints whenever it is idle) comes before the WAL reaches
    # the size it is cut back to, and the file stays at about 4 MiB.
    db.execute("PRAGMA wal_autocheckpoint=1000")
    db.execute("PRAGMA journal_size_limit=8388608")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and "room" in tables:
        version = 1
    if version > SCHEMA_VERSION:
        db.close()
        raise StateError(f"{path} has schema version {version}, newer than this broker knows ({SCHEMA_VERSION}); "
                         "run a newer Control Tower Lite, or use another --state-dir")
    if version == SCHEMA_VERSION:
        return db
    db.execute("BEGIN IMMEDIATE")
    try:
        script = _Script(db)
        if version == 0:
            script.executescript_statements(SCHEMA)
        else:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](script)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        db.close()
        raise
    return db


def room_name_for(root: str) -> str:
    base = "".join(c if c.isalnum() or c in "._-" else "-" for c in os.path.basename(root.rstrip("/")))
    base = base.lstrip("._-")[:56]
    return base or "project"


# ---------------------------------------------------------------- who is asking


@dataclass
class Actor:
    """Who is asking, as proven by the token, and in which room: never as claimed by the body."""
    kind: str                 # peer | operator | observer | watch | join | public
    peer: sqlite3.Row = None
    room_id: int = None       # a peer's own room; the room an operator or observer named
    token_expires: float = 0  # when the presented session token expires

    @property
    def name(self) -> str:
        return self.peer["name"] if self.peer is not None else self.kind

    @property
    def role(self) -> str:
        return self.peer["role"] if self.peer is not None else self.kind


@dataclass(frozen=True)
class JoinCaller:
    """What a joining session proves or says about itself: `resumed`, the peer its current token names;
    `presented`, the peer any genuine token of it names (kicked or superseded included); `agent`, an opaque
    id of its agent process (from the MCP server), so a kick outlives the token."""
    resumed: int = None
    presented: int = None
    agent: str = None


class StorageBusy(sqlite3.OperationalError):
    """Another process holds the database's write lock, found without waiting (inside the window after a wait)."""


class RateLimiter:
    """A sliding one-minute window per key, in memory: a restart forgives, which is fine for a brake."""

    def __init__(self, per_minute: int, unit: str = "messages"):
        self.per_minute, self.unit = per_minute, unit
        self.sent = {}

    def check(self, key, cost: int, now: float) -> None:
        window = self.sent.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) + cost <= self.per_minute:
            return
        if cost > self.per_minute:
            raise ApiError(429, "rate_limited", f"this needs {cost} of the {self.per_minute} {self.unit} allowed "
                                                "per minute; send to fewer peers", retry_after=60)
        oldest_needed = window[len(window) + cost - self.per_minute - 1]
        wait = max(1, int(oldest_needed + 60 - now + 0.999))
        raise ApiError(429, "rate_limited", f"limit of {self.per_minute} {self.unit} per minute reached; "
                                            f"wait {wait}s", retry_after=wait)

    def spend(self, key, cost: int, now: float) -> None:
        self.sent.setdefault(key, deque()).extend([now] * cost)


def _stopped():
    return ApiError(423, "room_stopped", "the human stopped the room; stop working and wait for the human")


class Store(Mail, Tasks, Locks, Memory):
    """Every rule of every room: rooms, peers, the operator's controls and the events here; mail, tasks, locks
    and memory in their own modules. Operations run in `tx()`: a transaction of their own, or a savepoint
    inside the event loop's batch, so one request's failure rolls back only itself."""

    def __init__(self, db_path: str, settings: Settings):
        self.settings = settings
        self.db = open_database(db_path)
        self._load_rooms()
        self.limiter = RateLimiter(settings.rate_limit)
        self.join_limiter = RateLimiter(settings.join_rate, "joins")
        self.room_limiter = RateLimiter(settings.room_rate, "new rooms")
        self.version = int(time.time() * 1000)   # bumps on every change the dashboard draws
        self.woken = set()                      # peer ids whose waiting reads should be retried
        self.unfolded = False                   # commits since the last checkpoint
        self.wake_everyone = False
        self._depth = 0                         # savepoints open inside the loop's transaction
        self._counts = {}                       # room id -> (version, tasks per status)
        self._unread = {}                       # peer id -> its unread summary, dropped when its mail changes
        self.lock_touched = {}                  # (room id, lock key) -> when its holder's edit hook last locked it
        self.retention = Retention()            # which rooms to prune, and the counted refusals
        self._synchronous = "FULL"              # what the next commit does: FULL fsyncs it, NORMAL does not
        self.busy_until = 0.0                   # until then a write lock held elsewhere is not waited for
        self._busy_waits = True                 # whether busy_timeout is set to wait (BUSY_WAIT_MS) or not (0)

    @contextlib.contextmanager
    def tx(self):
        if self.db.in_transaction:
            # Named by depth, not by a counter: a name used once is a statement SQLite prepares once and
            # that pushes a hot one out of the statement cache.
            self._depth += 1
            name = f"sp{self._depth}"
            try:
                self.db.execute(f"SAVEPOINT {name}")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute(f"ROLLBACK TO {name}")
                    self.db.execute(f"RELEASE {name}")
                    self._unread.clear()        # what was cached since may describe the undone writes
                    raise
                self.db.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self._begin()
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            self._unread.clear()
            raise
        self.db.execute("COMMIT")
        self.unfolded = True

    def _load_rooms(self) -> None:
        """Room states and which rooms are archived: read on every request, so kept in memory."""
        rows = self.db.execute("SELECT id, state, archived_at, wake FROM rooms").fetchall()
        self.room_states = {r["id"]: r["state"] for r in rows}
        self.room_wakes = {r["id"]: r["wake"] for r in rows}
        self.archived = {r["id"] for r in rows if r["archived_at"] is not None}

    def durability(self, promised: bool) -> None:
        """Fsync only commits holding a write some client is told is stored (synchronous=FULL). One holding only
        acks, heartbeats and read times (NORMAL) still reaches the WAL file, so it survives a killed broker, and
        the next FULL commit or checkpoint makes it durable too: power lost before that only redelivers. SQLite
        takes the setting only between transactions."""
        wanted = "FULL" if promised else "NORMAL"
        if wanted != self._synchronous and not self.db.in_transaction:
            self.db.execute(f"PRAGMA synchronous={wanted}")
            self._synchronous = wanted

    def _begin(self) -> None:
        """BEGIN IMMEDIATE. Another process's write lock is waited out (busy_timeout) at most once per short
        window: after a wait that failed, writes only try the lock, without waiting, until the window ends, so
        a batch of requests pays one wait, not one each, and a lock let go is taken again at once."""
        waits = time.monotonic() >= self.busy_until
        if waits != self._busy_waits:
            self.db.execute(f"PRAGMA busy_timeout={BUSY_WAIT_MS if waits else 0}")
            self._busy_waits = waits
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not waits:
                raise StorageBusy(str(exc)) from None
            self.busy_until = time.monotonic() + BUSY_WINDOW
            raise

    def begin_batch(self, promised: bool) -> bool:
        """Open the loop's group-commit transaction; False (run each request on its own) if another process
        holds the write lock, so reads still answer and writes fail fast with 503."""
        self.durability(promised)
        try:
            self._begin()
            return True
        except sqlite3.OperationalError:
            return False

    def commit_batch(self) -> bool:
        try:
            self.db.execute("COMMIT")
            self.unfolded = True
            return True
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            self._changed()                     # what was cached from the lost batch is stale
            self._unread.clear()
            self._load_rooms()
            return False

    def close(self) -> None:
        self.db.close()

    def _changed(self) -> None:
        self.version += 1

    # -- rooms

    def room_state(self, room_id: int) -> str:
        return self.room_states.get(room_id, "running")

    def room(self, room_id: int):
        row = self.db.execute("SELECT * FROM rooms WHERE id=?", (room_id,)).fetchone()
        if row is None:
            raise ApiError(404, "unknown_room", f"no room {room_id}; GET /rooms lists them")
        return row

    def _open_room(self, room_id: int) -> None:
        """Refuse changes to an archived room (which rooms are archived is known in memory)."""
        if room_id not in self.room_states:
            self.room(room_id)                  # 404 for a room that does not exist
        if room_id in self.archived:
            raise ApiError(409, "room_archived", "that room is archived: its history is read-only")

    def _room_for_join(self, key: str, name: str, root, now: float):
        row = self.db.execute("SELECT * FROM rooms WHERE key=? AND archived_at IS NULL", (key,)).fetchone()
        if row is not None:
            return row
        taken = {r[0] for r in self.db.execute("SELECT name FROM rooms WHERE archived_at IS NULL")}
        if len(taken) >= LIMITS["open_rooms"]:
            raise ApiError(507, "too_many_rooms", f"{len(taken)} rooms are open, the most the broker keeps; "
                                                  "ask the human to archive finished ones")
        self.room_limiter.check("new", 1, now)
        self.room_limiter.spend("new", 1, now)
        unique = name
        for n in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{name[:60]}-{n}"
        room_id = self.db.execute("INSERT INTO rooms(key, name, root, created_at) VALUES(?,?,?,?)",
                                  (key, unique, root, now)).lastrowid
        self.room_states[room_id] = "running"
        self._event(room_id, now, "room_opened", "broker", root or unique)
        return self.room(room_id)

    def list_rooms(self, now: float) -> list:
        cutoff = self._alive_cutoff(now)
        rows = self.db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM peers p WHERE p.room_id=r.id AND p.status='active' AND p.last_seen>=?) "
            "AS alive FROM rooms r ORDER BY r.archived_at IS NOT NULL, r.id DESC", (cutoff,)).fetchall()
        counts = {r["id"]: self.task_counts(r["id"]) for r in rows}
        return [{"id": r["id"], "name": r["name"], "root": r["root"], "state": r["state"],
                 "archived": r["archived_at"] is not None, "peers_alive": r["alive"], "tasks_done": counts[r["id"]]["done"],
                 "tasks_total": sum(counts[r["id"]].values()), "blockers_waiting": self._open_blockers(r["id"]),
                 "created_at": round(r["created_at"], 3),
                 "archived_at": round(r["archived_at"], 3) if r["archived_at"] else None} for r in rows]

    def archive_room(self, room_id: int, now: float) -> dict:
        """The team is done: the room becomes read-only history and the project's next join opens a fresh one."""
        with self.tx():
            self._open_room(room_id)
            room = self.room(room_id)
            for peer in self.db.execute("SELECT id FROM peers WHERE room_id=? AND status='active'", (room_id,)):
                self._release_peer(peer["id"], "closed", now, "room archived")
            self.db.execute("UPDATE rooms SET archived_at=? WHERE id=?", (now, room_id))
            self._event(room_id, now, "room_archived", "operator", room["name"])
            self._changed()
        self.archived.add(room_id)
        self.wake_everyone = True
        return {"archived": room["name"], "room": room_id}

    # -- peers and leases

    def peer_by_id(self, peer_id: int):
        return self.db.execute("SELECT * FROM peers WHERE id=?", (peer_id,)).fetchone()

    def _peer_by_name(self, room_id: int, name: str):
        return self.db.execute("SELECT * FROM peers WHERE room_id=? AND name=?", (room_id, name)).fetchone()

    def _alive_cutoff(self, now: float) -> float:
        return now - self.settings.lease_seconds

    def _is_alive(self, peer, now: float) -> bool:
        return peer["status"] == "active" and peer["last_seen"] >= self._alive_cutoff(now)

    def _architect(self, room_id: int, now: float):
        row = self.db.execute("SELECT * FROM peers WHERE room_id=? AND role='architect' AND status='active'",
                              (room_id,)).fetchone()
        return row if row is not None and self._is_alive(row, now) else None

    def _release_peer(self, peer_id: int, status: str, now: float, why: str) -> None:
        """A peer left, died, was kicked or its room closed: claims back to ready (with history), locks freed."""
        peer = self.peer_by_id(peer_id)
        self.db.execute("UPDATE peers SET status=? WHERE id=?", (status, peer_id))
        for task in self.db.execute("SELECT * FROM tasks WHERE assignee_id=? AND status='claimed'", (peer_id,)).fetchall():
            self._return_to_ready(task, peer, now, why)
        self.db.execute("DELETE FROM locks WHERE holder_id=?", (peer_id,))
        self._changed()

    def _return_to_ready(self, task, holder, now: float, why: str) -> None:
        """The next claimer learns who held it, for how long, and what they last said they were doing."""
        history = json.loads(task["history"])
        history.append({"holder": holder["name"] if holder else None, "why": why,
                        "held_seconds": round(now - (task["claimed_at"] or now)),
                        "last_status": holder["summary"] if holder else ""})
        self.db.execute("UPDATE tasks SET status='ready', assignee_id=NULL, claimed_at=NULL, history=? "
                        "WHERE room_id=? AND id=?", (json.dumps(history[-5:]), task["room_id"], task["id"]))

    def _reap(self, now: float) -> list:
        dead = self.db.execute("SELECT id, name, room_id FROM peers WHERE status='active' AND last_seen < ?",
                               (self._alive_cutoff(now),)).fetchall()
        for row in dead:
            self._release_peer(row["id"], "dead", now, "its session went silent")
            self._event(row["room_id"], now, "peer_dead", row["name"], "lease expired; claims and locks released")
        return dead

    def reap(self, now: float) -> list:
        """Run by the loop's tick and inside every lease-sensitive operation, so no thread has to survive."""
        if not self.db.execute("SELECT 1 FROM peers WHERE status='active' AND last_seen < ? LIMIT 1",
                               (self._alive_cutoff(now),)).fetchone():
            return []
        with self.tx():
            return self._reap(now)

    def _touch(self, peer, now: float) -> None:
        """Renew the peer's lease (at most once a second: a lease is tens of seconds); a peer that was
        declared dead comes back, without its old claims."""
        if peer["status"] == "active" and now - peer["last_seen"] < 1.0:
            return
        self.db.execute("UPDATE peers SET last_seen=?, status='active' WHERE id=?", (now, peer["id"]))
        if peer["status"] != "active":
            self._changed()

    def join(self, name: str, role, summary: str, root, room_key: str, room_name: str, caller, now: float,
             flagged=()):
        """Join (or rejoin) the room `room_key` names. Without a role, a resumed session keeps the one it holds."""
        with self.tx():
            self._reap(now)
            room = self._room_for_join(room_key, room_name, root, now)
            room_id = room["id"]
            row = self._peer_by_name(room_id, name)
            resumed = row is not None and caller.resumed == row["id"]
            if (row is not None and row["status"] == "kicked") or self._kicked_caller(room_id, caller):
                raise ApiError(403, "kicked", "the human removed this session from the room; "
                                              "ask the human before rejoining, under any name")
            if row is None and self.room_state(room_id) == "stopped":
                raise _stopped()
            if row is not None and self._is_alive(row, now) and not resumed:
                raise ApiError(409, "name_taken", f"{name} is in use by a live session; "
                                                  "choose another name with join(name=...) or CTL_NAME")
            if row is not None and row["id"] == room["seat_peer"] and not resumed:
                raise ApiError(409, "name_taken", f"{name} holds the architect seat: only its own session (with its "
                                                  "token) or the human can use that name; choose another name")
            skeleton = name_skeleton(name)
            if reads_as_authority(name):
                raise ApiError(400, "reserved_name", f"{name} is reserved; choose another name with join(name=...) "
                                                     "or CTL_NAME")
            for other in self.db.execute("SELECT name FROM peers WHERE room_id=? AND name != ?", (room_id, name)):
                # every peer the room has had, departed ones too: a look-alike must not squat a name its owner
                # may come back to
                if name_skeleton(other["name"]) == skeleton:
                    raise ApiError(409, "lookalike_name", f"{name} looks like the peer {other['name']} of this room; "
                                                          "choose a distinct name with join(name=...) or CTL_NAME")
            if row is None:
                live = self.db.execute("SELECT COUNT(*) FROM peers WHERE room_id=? AND status='active' AND last_seen>=?",
                                       (room_id, self._alive_cutoff(now))).fetchone()[0]
                if live >= LIMITS["live_peers"]:
                    raise ApiError(507, "room_full", f"the room already has {live} live sessions, the most it takes")
                self.join_limiter.check(room_id, 1, now)
                self.join_limiter.spend(room_id, 1, now)
            role = self._seat_role(room, row if resumed else None, role or (row["role"] if resumed else None)
                                   or "worker")
            flags = flags_json(flagged, ("summary",))      # a new summary, its own mark or none
            if row is None:
                peer_id = self.db.execute(
                    "INSERT INTO peers(room_id, name, role, generation, status, summary, root, joined_at, last_seen, "
                    "agent, flags) VALUES(?,?,?,1,'active',?,?,?,?,?,?)",
                    (room_id, name, role, summary, root, now, now, caller.agent, flags)).lastrowid
            else:
                peer_id = row["id"]
                self.db.execute("UPDATE peers SET role=?, generation=generation+1, status='active', summary=?, "
                                "flags=?, root=COALESCE(?, root), joined_at=?, last_seen=?, agent=COALESCE(?, agent) "
                                "WHERE id=?", (role, summary, flags, root, now, now, caller.agent, peer_id))
            if role == "architect" and room["seat_peer"] is None:
                self.db.execute("UPDATE rooms SET seat_peer=? WHERE id=?", (peer_id, room_id))
            self._event(room_id, now, "joined", name, f"as {role}" + (" (resumed)" if resumed else ""))
            self._changed()
            return self.peer_by_id(peer_id)

    def _kicked_caller(self, room_id: int, caller) -> bool:
        """A kick removes the session, not one of its names: its token (even superseded) and its agent process
        are refused in that room, under any name, until the human resets the room."""
        if caller.presented is not None:
            peer = self.peer_by_id(caller.presented)
            if peer is not None and peer["room_id"] == room_id and peer["status"] == "kicked":
                return True
        return caller.agent is not None and self.db.execute(
            "SELECT 1 FROM peers WHERE room_id=? AND agent=? AND status='kicked' LIMIT 1",
            (room_id, caller.agent)).fetchone() is not None

    def _seat_role(self, room, resumed_row, role: str) -> str:
        """The seat is free only in a room that never had an architect; after that it belongs to its holder's
        peer row, alive or dead, which only a session with that row's current token resumes (a name alone is
        not enough), until the operator hands it over or revokes it; a revocation sticks."""
        if role != "architect":
            return role
        seat = room["seat_peer"]
        if seat is None or (resumed_row is not None and resumed_row["id"] == seat):
            return role
        raise ApiError(409, "architect_seat_taken", f"{self.seat_text(room, time.time())}; join as a worker")

    def seat_text(self, room, now: float) -> str:
        """The one description of the seat every answer, the dashboard and `launch.py --status` give, with what
        to do about it."""
        holder = self.peer_by_id(room["seat_peer"]) if room["seat_peer"] else None
        if room["seat_peer"] is None:
            return 'nobody holds the architect seat yet: a session takes it with join(role="architect")'
        if holder is None:
            return ("nobody holds the architect seat (the human revoked it, or its holder left): only the human "
                    "can hand it to a session, from the dashboard")
        if self._is_alive(holder, now):
            return f"{holder['name']} holds the architect seat"
        return (f"{holder['name']} holds the architect seat, but its session is not running (last seen "
                f"{time.strftime('%H:%M', time.localtime(holder['last_seen']))}); messages to it wait for its "
                "return. Wait, or ask the human to hand the seat over, from the dashboard")

    def seat_holder(self, room) -> str:
        """The seat as the dashboard shows it: the holder's name, "" when revoked or vacated, None if never held."""
        if room["seat_peer"] is None:
            return None
        holder = self.peer_by_id(room["seat_peer"]) if room["seat_peer"] else None
        return holder["name"] if holder else ""

    def leave(self, peer, now: float) -> None:
        """Leaving gives up the seat too: the human hands it to the next architect."""
        with self.tx():
            self._release_peer(peer["id"], "left", now, "its session left")
            self._vacate_seat(peer)
            self._event(peer["room_id"], now, "left", peer["name"], "claims and locks released")

    def heartbeat(self, peer, summary, reach, now: float, flagged=()) -> dict:
        """Keeps the lease; in a stopped room the summary stays as it was (a stop freezes every agent change)."""
        with self.tx():
            self._touch(peer, now)
            if summary is not None and self.room_state(peer["room_id"]) != "stopped":
                self.db.execute("UPDATE peers SET summary=?, flags=? WHERE id=?",
                                (summary, flags_json(flagged, ("summary",)), peer["id"]))
                self._changed()
            if reach is not None:
                self.note_reach(peer, reach)
        return {"room": self.room_state(peer["room_id"]), "lease_seconds": self.settings.lease_seconds,
                **self.unread_summary(peer)}

    def note_reach(self, peer, reach: str) -> None:
        """How the peer hears messages now (push, a watcher, hooks, or its next tool call), for the peer list."""
        if reach != peer["reach"]:
            with self.tx():
                self.db.execute("UPDATE peers SET reach=? WHERE id=?", (reach, peer["id"]))
            self._changed()

    def unread_summary(self, peer) -> dict:
        """How many messages wait, and from whom the latest: the one-line notice every tool result carries.
        Messages held by a pause are not counted: they are not readable until the human resumes. Kept per
        peer until its deliveries change, so a session with a long backlog does not count it on every call."""
        held = self.room_state(peer["room_id"]) == "paused"
        cached = self._unread.get(peer["id"])
        if cached is None or cached[0] != held:
            cached = self._unread[peer["id"]] = (held, self._count_unread(peer["id"], held))
        return dict(cached[1])

    def _count_unread(self, peer_id: int, held: bool) -> dict:
        readable = "AND m.origin != 'agent'" if held else ""
        row = self.db.execute(
            "SELECT COUNT(*) AS n, MAX(d.id) AS latest FROM deliveries d JOIN messages m ON m.id=d.message_id "
            f"WHERE d.peer_id=? AND d.acked_at IS NULL {readable}", (peer_id,)).fetchone()
        if not row["n"]:
            return {"unread": 0}
        latest = self.db.execute("SELECT m.sender, m.category FROM deliveries d JOIN messages m ON m.id=d.message_id "
                                 "WHERE d.id=?", (row["latest"],)).fetchone()
        return {"unread": row["n"], "latest_from": latest["sender"], "latest_category": latest["category"]}

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
        return with_flags({"name": peer["name"], "role": peer["role"], "state": state, "summary": peer["summary"],
                           "last_seen": round(peer["last_seen"], 3), "reach": peer["reach"],
                           "last_read": round(peer["last_read"], 3) if peer["last_read"] else None}, peer)

    def list_peers(self, room_id: int, now: float) -> list:
        rows = self.db.execute("SELECT * FROM peers WHERE room_id=? AND status='active' AND last_seen>=? ORDER BY id",
                               (room_id, self._alive_cutoff(now))).fetchall()
        return [self.peer_view(r, now) for r in rows]

    # -- operator

    def set_room_state(self, room_id: int, state: str, lift_kicks: bool, now: float) -> dict:
        with self.tx():
            self._open_room(room_id)
            self.db.execute("UPDATE rooms SET state=? WHERE id=?", (state, room_id))
            if lift_kicks:
                self.db.execute("UPDATE peers SET status='left' WHERE room_id=? AND status='kicked'", (room_id,))
            self._event(room_id, now, "room_reset" if lift_kicks else f"room_{state}", "operator", "")
            self._changed()
        self.room_states[room_id] = state
        self.wake_everyone = True
        return {"room": state}

    def set_wake(self, room_id: int, wake: str, now: float) -> dict:
        """"never": no idle session of this room is woken; a waiting one ends at its next look."""
        with self.tx():
            self._open_room(room_id)
            self.db.execute("UPDATE rooms SET wake=? WHERE id=?", (wake, room_id))
            self._event(room_id, now, "room_wake", "operator", wake)
            self._changed()
        self.room_wakes[room_id] = wake
        self.wake_everyone = True
        return {"wake": wake}

    def _live_peer(self, room_id: int, name: str, now: float):
        row = self._peer_by_name(room_id, name)
        if row is None or row["status"] != "active":
            raise ApiError(404, "unknown_peer", "no peer of that name is in the room")
        return row

    def kick(self, room_id: int, name: str, now: float) -> dict:
        with self.tx():
            row = self._peer_by_name(room_id, name)
            if row is None or row["status"] == "kicked":
                raise ApiError(404, "unknown_peer", "no peer of that name to kick")
            self._release_peer(row["id"], "kicked", now, "the human removed its session")
            self.db.execute("UPDATE peers SET generation=generation+1, role='worker' WHERE id=?", (row["id"],))
            self._vacate_seat(row)
            self._event(room_id, now, "kicked", "operator", name)
        self.wake_everyone = True
        return {"kicked": name}

    def _vacate_seat(self, peer) -> None:
        self.db.execute("UPDATE rooms SET seat_peer=? WHERE id=? AND seat_peer=?",
                        (SEAT_REVOKED, peer["room_id"], peer["id"]))

    def set_architect(self, room_id: int, name, now: float) -> dict:
        with self.tx():
            self._open_room(room_id)
            target = self._live_peer(room_id, name, now) if name is not None else None
            self.db.execute("UPDATE peers SET role='worker' WHERE room_id=? AND role='architect'", (room_id,))
            if target is not None:
                self.db.execute("UPDATE peers SET role='architect' WHERE id=?", (target["id"],))
            self.db.execute("UPDATE rooms SET seat_peer=? WHERE id=?",
                            (target["id"] if target is not None else SEAT_REVOKED, room_id))
            self._event(room_id, now, "architect_seat", "operator", f"handed to {name}" if name else "revoked")
            self._changed()
        return {"architect": name}

    # -- events, retention, the dashboard's view

    def _event(self, room_id, now: float, kind: str, actor: str, detail: str) -> None:
        self.db.execute("INSERT INTO events(room_id, at, kind, actor, detail) VALUES(?,?,?,?,?)",
                        (room_id, now, kind, actor, detail))
        self.retention.touched.add(room_id)

    def record_event(self, room_id, kind: str, actor: str, detail: str, now: float) -> None:
        with self.tx():
            self._event(room_id, now, kind, actor, detail)

    def record_counted(self, room_id, kind: str, actor: str, detail: str, now: float) -> None:
        """Refusals (and flags of fields other than a message's) are counted per room, kind, caller and minute,
        so a flood, from a web page or a peer, makes one row a minute and pushes no other event out."""
        with self.tx():
            self.retention.counted_event(self.db, room_id, kind, actor, detail, now)

    def prune(self, now: float) -> None:
        """Peers gone for days are forgotten with the mail nobody will read (an archived room's stays: it is
        history). Old read messages and events go room by room, in `prune_step`."""
        self._unread.clear()                    # gone peers' mail goes
        with self.tx():
            gone = now - GONE_PEER_DAYS * 86400
            self.db.execute("DELETE FROM deliveries WHERE acked_at IS NULL AND peer_id IN (SELECT id FROM peers "
                            "WHERE status IN ('left', 'dead') AND last_seen < ?)", (gone,))

    def prune_step(self) -> None:
        """From every tick: each room keeps its newest events and messages (unread ones always), within a budget."""
        if self.retention.touched:
            with self.tx():
                self.retention.step(self.db, self.archived, self.settings.retention)

    def _open_blockers(self, room_id: int) -> int:
        return self.db.execute(                 # the room's blockers (a partial index), then their deliveries
            "SELECT COUNT(DISTINCT m.id) FROM messages m INDEXED BY messages_blockers JOIN deliveries d "
            "ON d.message_id = m.id WHERE m.room_id=? AND m.category='blocker' AND d.acked_at IS NULL",
            (room_id,)).fetchone()[0]

    def snapshot(self, room_id: int, since, after_message: int, after_event: int, now: float) -> dict:
        room = self.room(room_id)
        view = {"version": self.version, "now": round(now, 3), "lease_seconds": self.settings.lease_seconds}
        architect = self._architect(room_id, now)
        view["room"] = {"id": room_id, "name": room["name"], "root": room["root"], "state": room["state"],
                        "archived": room["archived_at"] is not None, "seat": self.seat_holder(room),
                        "architect": architect["name"] if architect else None,
                        "seat_text": self.seat_text(room, now), "wake": room["wake"]}
        peers = self.db.execute("SELECT * FROM peers WHERE room_id=? AND status != 'left' ORDER BY id LIMIT 500",
                                (room_id,)).fetchall()
        claims, locks, unread = {}, {}, {}
        for peer_id, task_id in self.db.execute("SELECT assignee_id, id FROM tasks WHERE room_id=? AND status='claimed'",
                                                (room_id,)):
            claims.setdefault(peer_id, []).append(task_id)
        for peer_id, display in self.db.execute("SELECT holder_id, display FROM locks WHERE room_id=?", (room_id,)):
            locks.setdefault(peer_id, []).append(display)
        for row in peers:                       # counted up to a bound: a poll's cost must not grow with a backlog
            unread[row["id"]] = self.db.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM deliveries WHERE peer_id=? AND acked_at IS NULL LIMIT ?)",
                (row["id"], LIMITS["unread_shown"])).fetchone()[0]
        view["peers"] = [{**self.peer_view(r, now), "claims": claims.get(r["id"], []), "locks": locks.get(r["id"], []),
                          "unread": unread[r["id"]]} for r in peers]
        if since != self.version:
            view["tasks"] = self.list_tasks(room_id, None, limit=LIMITS["dashboard_tasks"])
            view["locks"] = self.list_locks(room_id)
            view["memory"] = self.get_memory(room_id, None)["entries"]
        rows = self.db.execute("SELECT * FROM messages WHERE room_id=? AND id > ? ORDER BY id DESC LIMIT 200",
                               (room_id, after_message)).fetchall()
        paused = room["state"] == "paused"
        messages = []
        for r in rows:
            entry = self._message_view(r)
            if paused and r["origin"] == "agent" and self.db.execute(
                    "SELECT 1 FROM deliveries WHERE message_id=? AND acked_at IS NULL LIMIT 1", (r["id"],)).fetchone():
                entry["held"] = True
            messages.append(entry)
        view["messages"] = messages
        view["open_blockers"] = self._open_blockers(room_id)
        events = self.db.execute("SELECT * FROM events WHERE (room_id=? OR room_id IS NULL) AND id > ? "
                                 "ORDER BY id DESC LIMIT 200", (room_id, after_event))
        view["events"] = [{"id": r["id"], "at": round(r["at"], 3), "kind": r["kind"], "actor": r["actor"],
                           "detail": r["detail"], "count": r["count"]} for r in events]
        return view

    def checkpoint(self) -> None:
        """From the loop when it has nothing to do: commits since the last time are folded back into the
        database, and the WAL restarts from its beginning, so the next commits overwrite it."""
        if self.unfolded:
            self.db.execute("PRAGMA wal_checkpoint(RESTART)")
            self.unfolded = False
