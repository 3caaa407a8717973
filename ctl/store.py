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

from ctl.config import BUSY_WAIT_MS, BUSY_WINDOW, GONE_PEER_DAYS, LIMITS, TASK_STATUSES, Settings
from ctl.common import StateError
from ctl.errors import ApiError
from ctl import paths
from ctl.names import name_skeleton, reads_as_authority
from ctl.retention import Retention

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


def flags_json(flagged, fields, kept=None):
    """The filter's flags on these fields, as stored (`{field: rule}` in JSON, None for none), over the ones a
    row already `kept` for its other fields."""
    marks = {k: v for k, v in json.loads(kept).items() if k not in fields} if kept else {}
    marks.update((field, rule) for field, rule in flagged or () if field in fields)
    return json.dumps(marks, sort_keys=True) if marks else None


def with_flags(view: dict, row) -> dict:
    """A row's view, with `flagged` ({field: rule}) when the filter flagged any of its text."""
    if row["flags"]:
        view["flagged"] = json.loads(row["flags"])
    return view


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


def resolve_lock_path(root: str, path: str) -> str:
    """One canonical absolute path per file, however it is spelled; refuse anything outside the root."""
    if not path.strip():
        raise ApiError(400, "bad_path", "path is empty; give a file path inside your project")
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    real_root = os.path.realpath(root)
    if real == real_root or not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ApiError(400, "path_outside_root", f"path must name a file inside your project root {real_root}")
    if os.path.isdir(real):
        raise ApiError(400, "path_is_directory", "that path is a directory; lock each file you will edit")
    return real


def _stopped():
    return ApiError(423, "room_stopped", "the human stopped the room; stop working and wait for the human")


OPEN_STATUSES = tuple(s for s in TASK_STATUSES if s != "done")
TASK_VIEW_COLUMNS = "id, title, description, status, assignee_id, done_by, summary, files, history, flags"
# A page of one status. The status is spelled out, not bound: a bound value compared with a column that a
# partial index (tasks_done) tests makes SQLite prepare the statement anew on every run, about 15 µs each.
TASK_PAGE_SQL = {s: f"SELECT {TASK_VIEW_COLUMNS} FROM tasks WHERE room_id=? AND status='{s}' AND id>? "
                    "ORDER BY id LIMIT ?" for s in TASK_STATUSES}


def _json_list(text) -> list:
    """A stored JSON list; most are empty, and the parser is not free."""
    return json.loads(text) if text and text != "[]" else []


class Store:
    """Every rule of every room. Operations run in `tx()`: a transaction of their own, or a savepoint
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

    def join(self, name: str, role, summary: str, root, room_key: str, room_name: str, caller, now: float):
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
            if row is None:
                peer_id = self.db.execute(
                    "INSERT INTO peers(room_id, name, role, generation, status, summary, root, joined_at, last_seen, "
                    "agent) VALUES(?,?,?,1,'active',?,?,?,?,?)",
                    (room_id, name, role, summary, root, now, now, caller.agent)).lastrowid
            else:
                peer_id = row["id"]
                self.db.execute("UPDATE peers SET role=?, generation=generation+1, status='active', summary=?, "
                                "root=COALESCE(?, root), joined_at=?, last_seen=?, agent=COALESCE(?, agent) WHERE id=?",
                                (role, summary, root, now, now, caller.agent, peer_id))
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

    # -- messages

    def send(self, actor: Actor, to: str, content: str, category: str, flag, now: float) -> dict:
        room_id = actor.room_id
        with self.tx():                             # recipients are checked alive one by one: no sweep needed
            self._open_room(room_id)
            state = self.room_state(room_id)
            sender_id = actor.peer["id"] if actor.peer is not None else None
            if sender_id is not None:
                self._touch(actor.peer, now)
            recipients = self._recipients(room_id, to, sender_id, now)
            architect = self._architect(room_id, now) if category == "blocker" else None
            if category == "blocker" and architect is not None and architect["id"] != sender_id \
                    and all(r["id"] != architect["id"] for r in recipients):
                recipients.append(architect)
            cost = max(1, len(recipients))
            if actor.kind == "peer":
                self.limiter.check(sender_id, cost, now)
            origin = "operator" if actor.kind == "operator" else "agent"
            message_id = self.db.execute(
                "INSERT INTO messages(room_id, sender, sender_role, origin, recipient, category, content, created_at, "
                "flag) VALUES(?,?,?,?,?,?,?,?,?)",
                (room_id, actor.name, actor.role, origin, to, category, content, now, flag)).lastrowid
            self.db.executemany("INSERT INTO deliveries(peer_id, message_id) VALUES(?,?)",
                                [(r["id"], message_id) for r in recipients])
            for r in recipients:
                self._unread.pop(r["id"], None)
            if flag:
                self._event(room_id, now, "content_flagged", actor.name, f"message #{message_id} (rule {flag})")
            if actor.kind == "peer":
                self.limiter.spend(sender_id, cost, now)
            self.woken.update(r["id"] for r in recipients)
            self.retention.touched.add(room_id)
        result = {"message_id": message_id, "delivered_to": [r["name"] for r in recipients]}
        if state == "paused" and origin == "agent":
            result["held"] = "the room is paused; delivery resumes when the human resumes it"
        if category == "blocker":
            result["blocker"] = "shown to the human" + ("" if architect else "; no architect is in the room")
        if flag:
            result["flagged"] = flag
        return result

    def check_send(self, actor: Actor, to: str, now: float) -> None:
        """What a send is refused for before its text is screened: no such recipient, the rate limit."""
        sender_id = actor.peer["id"] if actor.peer is not None else None
        recipients = self._recipients(actor.room_id, to, sender_id, now)
        if actor.kind == "peer":
            self.limiter.check(sender_id, max(1, len(recipients)), now)

    def _recipients(self, room_id: int, to: str, sender_id, now: float) -> list:
        """`*` is every live peer of this room; `architect` whoever holds its seat; else a peer by name."""
        if to == "*":
            return [r for r in self.db.execute("SELECT * FROM peers WHERE room_id=? AND status='active' ORDER BY id",
                                                (room_id,)) if r["id"] != sender_id and self._is_alive(r, now)]
        if to == "architect":
            room = self.room(room_id)
            target = self.peer_by_id(room["seat_peer"]) if room["seat_peer"] else None
            if target is None:
                raise ApiError(404, "no_architect", f"{self.seat_text(room, now)}; meanwhile send to a peer by name "
                                                    "or to \"*\"")
        else:
            target = self._peer_by_name(room_id, to)
            if target is None or target["status"] in ("kicked", "closed"):
                live = ", ".join(p["name"] for p in self.list_peers(room_id, now)) or "nobody"
                raise ApiError(404, "unknown_peer", f"no peer of that name in this room; in the room: {live}")
        if target["id"] == sender_id:
            raise ApiError(400, "self_message", "you cannot message yourself")
        return [target]

    def inbox(self, peer, limit: int, ack_through=None, now=None) -> dict:
        """Unread messages, oldest first; they stay unread until acknowledged, so a crash loses none.
        `ack_through` acknowledges what an earlier read returned, up to that delivery id, in the same call."""
        peer_id = peer["id"]
        if ack_through is not None:
            with self.tx():
                self.db.execute("UPDATE deliveries SET acked_at=? WHERE peer_id=? AND acked_at IS NULL AND id<=?",
                                (now, peer_id, ack_through))
                self._unread.pop(peer_id, None)
                self._note_read(peer, now)
        state = self.room_state(peer["room_id"])
        held = "AND m.origin != 'agent'" if state == "paused" else ""
        rows = self.db.execute(
            "SELECT d.id AS delivery_id, m.* FROM deliveries d JOIN messages m ON m.id = d.message_id "
            f"WHERE d.peer_id=? AND d.acked_at IS NULL {held} ORDER BY d.id LIMIT ?", (peer_id, limit)).fetchall()
        return {"room": state, "messages": [self._message_view(r, r["delivery_id"]) for r in rows]}

    def _note_read(self, peer, now: float) -> None:
        """When the peer last read its mail, to the second: a reading loop rewrites no row in between."""
        if peer["last_read"] is None or now - peer["last_read"] >= 1.0:
            self.db.execute("UPDATE peers SET last_read=? WHERE id=?", (now, peer["id"]))

    @staticmethod
    def _message_view(row, delivery_id=None) -> dict:
        view = {"id": row["id"], "from": row["sender"], "from_role": row["sender_role"], "origin": row["origin"],
                "to": row["recipient"], "category": row["category"], "content": row["content"],
                "at": round(row["created_at"], 3)}
        if delivery_id is not None:
            view["delivery_id"] = delivery_id
        if row["flag"]:
            view["flagged"] = row["flag"]
        return view

    def ack(self, peer, delivery_ids: list, now: float) -> dict:
        with self.tx():
            marks = ",".join("?" * len(delivery_ids))
            cursor = self.db.execute(f"UPDATE deliveries SET acked_at=? WHERE peer_id=? AND acked_at IS NULL "
                                     f"AND id IN ({marks})", (now, peer["id"], *delivery_ids))
            self._unread.pop(peer["id"], None)
            self._note_read(peer, now)
        return {"acked": cursor.rowcount}

    def receipts(self, peer, limit: int = 5) -> list:
        """What became of this peer's latest messages: who has read them, who has not yet."""
        rows = self.db.execute("SELECT id, recipient, created_at FROM messages WHERE room_id=? AND sender=? "
                               "AND origin='agent' ORDER BY id DESC LIMIT ?",
                               (peer["room_id"], peer["name"], limit)).fetchall()
        out = []
        for row in rows:
            read, unread = [], []
            for d in self.db.execute("SELECT p.name, d.acked_at FROM deliveries d JOIN peers p ON p.id=d.peer_id "
                                     "WHERE d.message_id=? ORDER BY p.name", (row["id"],)):
                (read if d["acked_at"] else unread).append(d["name"])
            out.append({"id": row["id"], "to": row["recipient"], "read_by": read, "unread_by": unread})
        return out

    # -- tasks

    def _task(self, room_id: int, task_id: int):
        row = self.db.execute("SELECT * FROM tasks WHERE room_id=? AND id=?", (room_id, task_id)).fetchone()
        if row is None:
            raise ApiError(404, "unknown_task", f"no task #{task_id}; call list_tasks to see the ids")
        return row

    def _deps(self, room_id: int, task_id: int) -> list:
        return [r[0] for r in self.db.execute("SELECT depends_on FROM task_deps WHERE room_id=? AND task_id=? "
                                              "ORDER BY depends_on", (room_id, task_id))]

    def _waiting_on(self, room_id: int, task_id: int) -> list:
        return [r[0] for r in self.db.execute(
            "SELECT d.depends_on FROM task_deps d JOIN tasks t ON t.room_id = d.room_id AND t.id = d.depends_on "
            "WHERE d.room_id=? AND d.task_id=? AND t.status != 'done' ORDER BY d.depends_on", (room_id, task_id))]

    def _task_views(self, room_id: int, rows: list) -> list:
        """Views of many tasks in two queries, not three per task: the dashboard lists them all."""
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        deps = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            for task_id, dependency, status in self.db.execute(
                    "SELECT d.task_id, d.depends_on, t.status FROM task_deps d JOIN tasks t "
                    "ON t.room_id = d.room_id AND t.id = d.depends_on WHERE d.room_id=? AND d.task_id IN "
                    f"({','.join('?' * len(part))}) ORDER BY d.depends_on", (room_id, *part)):
                deps.setdefault(task_id, []).append((dependency, status))
        holders = list({r["assignee_id"] for r in rows if r["assignee_id"] is not None})
        names = dict(self.db.execute(f"SELECT id, name FROM peers WHERE id IN ({','.join('?' * len(holders))})",
                                     holders).fetchall()) if holders else {}
        views = []
        for row in rows:
            edges_of = deps.get(row["id"], [])
            view = with_flags({"id": row["id"], "title": row["title"], "status": row["status"],
                               "depends_on": [d for d, _ in edges_of]}, row)
            if row["description"]:
                view["description"] = row["description"]
            if row["status"] == "blocked":
                view["waiting_on"] = [d for d, status in edges_of if status != "done"]
            if row["assignee_id"] is not None:
                view["assignee"] = names.get(row["assignee_id"])
            if row["status"] == "done":
                view.update(done_by=row["done_by"], summary=row["summary"], files=_json_list(row["files"]))
            elif row["history"] != "[]":
                view["previous_holders"] = json.loads(row["history"])
            views.append(view)
        return views

    def _task_view(self, room_id: int, task_id: int) -> dict:
        return self._task_views(room_id, [self._task(room_id, task_id)])[0]

    def _check_deps_exist(self, room_id: int, depends_on: list) -> None:
        """Each dependency exists, and has room for one more task waiting on it (so completing it stays cheap)."""
        if not depends_on:
            return
        marks = ",".join("?" * len(depends_on))
        found = {r[0] for r in self.db.execute(f"SELECT id FROM tasks WHERE room_id=? AND id IN ({marks})",
                                               (room_id, *depends_on))}
        missing = [d for d in depends_on if d not in found]
        if missing:
            raise ApiError(400, "unknown_dependency",
                           f"depends_on names unknown tasks {', '.join(f'#{d}' for d in missing)}")
        full = [d for d in depends_on if self.db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM task_deps WHERE room_id=? AND depends_on=? LIMIT ?)",
            (room_id, d, LIMITS["dependents"])).fetchone()[0] >= LIMITS["dependents"]]
        if full:
            raise ApiError(507, "too_many_dependents", f"{LIMITS['dependents']} tasks already wait on "
                           f"{', '.join(f'#{d}' for d in full)}; make them depend on an intermediate task")

    def _status_from_deps(self, room_id: int, task_id: int) -> str:
        return "blocked" if self._waiting_on(room_id, task_id) else "ready"

    def create_task(self, actor: Actor, title: str, description: str, depends_on: list, now: float,
                    flagged=()) -> dict:
        room_id = actor.room_id
        with self.tx():
            self._open_room(room_id)
            top = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM tasks WHERE room_id=?", (room_id,)).fetchone()[0]
            if sum(self.task_counts(room_id).values()) >= LIMITS["tasks"]:
                raise ApiError(507, "too_many_tasks", f"a room holds at most {LIMITS['tasks']} tasks")
            self._check_deps_exist(room_id, depends_on)
            task_id = top + 1
            self.db.execute("INSERT INTO tasks(room_id, id, title, description, status, created_by, created_at, flags) "
                            "VALUES(?,?,?,?,'blocked',?,?,?)", (room_id, task_id, title, description, actor.name, now,
                                                               flags_json(flagged, ("title", "description"))))
            self.db.executemany("INSERT INTO task_deps VALUES(?,?,?)", [(room_id, task_id, d) for d in depends_on])
            self.db.execute("UPDATE tasks SET status=? WHERE room_id=? AND id=?",
                            (self._status_from_deps(room_id, task_id), room_id, task_id))
            self._changed()
            return self._task_view(room_id, task_id)

    def _reaches(self, room_id: int, start: int, goal: int) -> bool:
        """Whether `goal` is among the transitive dependencies of `start`."""
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(self._deps(room_id, node))
        return False

    def update_task(self, actor: Actor, task_id: int, fields: dict, now: float, flagged=()) -> dict:
        room_id = actor.room_id
        with self.tx():
            self._open_room(room_id)
            task = self._task(room_id, task_id)
            if "depends_on" in fields:
                depends_on = fields["depends_on"]
                if task["status"] in ("claimed", "done"):
                    raise ApiError(409, "task_not_editable",
                                   f"task #{task_id} is {task['status']}; only blocked or ready tasks change dependencies")
                self._check_deps_exist(room_id, depends_on)
                cyclic = [d for d in depends_on if d == task_id or self._reaches(room_id, d, task_id)]
                if cyclic:
                    raise ApiError(409, "dependency_cycle", f"depending on {', '.join(f'#{d}' for d in cyclic)} "
                                                            f"would make a cycle through task #{task_id}")
                self.db.execute("DELETE FROM task_deps WHERE room_id=? AND task_id=?", (room_id, task_id))
                self.db.executemany("INSERT INTO task_deps VALUES(?,?,?)", [(room_id, task_id, d) for d in depends_on])
                self.db.execute("UPDATE tasks SET status=? WHERE room_id=? AND id=?",
                                (self._status_from_deps(room_id, task_id), room_id, task_id))
            for column in ("title", "description"):
                if column in fields:
                    self.db.execute(f"UPDATE tasks SET {column}=? WHERE room_id=? AND id=?",
                                    (fields[column], room_id, task_id))
            texts = tuple(column for column in ("title", "description") if column in fields)
            if texts:
                self.db.execute("UPDATE tasks SET flags=? WHERE room_id=? AND id=?",
                                (flags_json(flagged, texts, task["flags"]), room_id, task_id))
            self._changed()
            return self._task_view(room_id, task_id)

    def list_tasks(self, room_id: int, status, after=None, limit=None) -> dict:
        """One page of a room's tasks in id order, so a listing stays short however long the room lives: with
        a status, that kind; without, the open ones (and, on the first page, the latest few done ones).
        `next_after` is the cursor for the next page; what no page shows is counted, never dropped silently."""
        limit = limit or LIMITS["task_list"]
        counts = self.task_counts(room_id)
        rows = []
        for kind in (status,) if status else OPEN_STATUSES:     # each kind is one index range
            rows += self.db.execute(TASK_PAGE_SQL[kind], (room_id, after or 0, limit + 1)).fetchall()
        rows.sort(key=lambda r: r["id"])
        page, more = rows[:limit], len(rows) > limit
        if not status and not after:
            done = self.db.execute(f"SELECT {TASK_VIEW_COLUMNS} FROM tasks INDEXED BY tasks_done "
                                   "WHERE room_id=? AND status='done' "
                                   "ORDER BY done_at DESC LIMIT ?", (room_id, LIMITS["recent_done"])).fetchall()
            page += sorted(done, key=lambda r: r["id"])
        listed = counts[status] if status else sum(counts.values())
        result = {"tasks": self._task_views(room_id, page), "counts": counts, "not_shown": listed - len(page)}
        if more:
            result["next_after"] = page[limit - 1]["id"]
        return result

    def ready_for(self, peer) -> int:
        """How many tasks an idle worker could claim now: none for an architect or a worker holding a claim."""
        if peer["role"] != "worker" or self.db.execute(
                "SELECT 1 FROM tasks WHERE assignee_id=? AND status='claimed' LIMIT 1", (peer["id"],)).fetchone():
            return 0
        return self.task_counts(peer["room_id"])["ready"]

    def task_counts(self, room_id: int) -> dict:
        """Tasks per status, counted once per change of the room's state rather than on every listing
        (100,000 tasks take milliseconds to count)."""
        cached = self._counts.get(room_id)
        if cached is not None and cached[0] == self.version:
            return dict(cached[1])
        counts = dict.fromkeys(TASK_STATUSES, 0)
        for row in self.db.execute("SELECT status, COUNT(*) FROM tasks WHERE room_id=? GROUP BY status", (room_id,)):
            counts[row[0]] = row[1]
        self._counts[room_id] = (self.version, counts)
        return dict(counts)

    def claim(self, peer, task_id, now: float) -> dict:
        room_id = peer["room_id"]
        with self.tx():
            self._reap(now)
            self._touch(peer, now)
            if task_id is None:
                row = self.db.execute("SELECT id FROM tasks WHERE room_id=? AND status='ready' ORDER BY id LIMIT 1",
                                      (room_id,)).fetchone()
                if row is None:
                    counts = self.task_counts(room_id)
                    raise ApiError(404, "no_ready_task",
                                   f"no task is ready ({counts['blocked']} blocked, {counts['claimed']} claimed, "
                                   f"{counts['done']} done); check your inbox and try again later")
                task_id = row["id"]
            task = self._task(room_id, task_id)
            if task["status"] != "ready":
                raise ApiError(409, "task_not_ready", self._why_not_ready(task))
            self.db.execute("UPDATE tasks SET status='claimed', assignee_id=?, claimed_at=? "
                            "WHERE room_id=? AND id=? AND status='ready'", (peer["id"], now, room_id, task_id))
            self._event(room_id, now, "claimed", peer["name"], f"task #{task_id}")
            self._changed()
            return self._task_view(room_id, task_id)

    def _why_not_ready(self, task) -> str:
        if task["status"] == "blocked":
            waiting = ", ".join(f"#{d}" for d in self._waiting_on(task["room_id"], task["id"]))
            return f"task #{task['id']} is blocked, waiting on {waiting}"
        if task["status"] == "claimed":
            holder = self.peer_by_id(task["assignee_id"])
            return f"task #{task['id']} is already claimed by {holder['name'] if holder else 'another peer'}"
        return f"task #{task['id']} is already done by {task['done_by']}"

    def check_completion(self, actor: Actor, task_id: int) -> None:
        """What a completion is refused for before its summary is screened: no such task, not the caller's claim."""
        self._refuse_completion(actor, self._task(actor.room_id, task_id))

    def _refuse_completion(self, actor: Actor, task) -> None:
        if actor.kind == "peer":
            if task["status"] != "claimed" or task["assignee_id"] != actor.peer["id"]:
                why = (f"task #{task['id']} is ready: your claim expired or was released; claim it again"
                       if task["status"] == "ready" else self._why_not_ready(task))
                raise ApiError(409, "not_your_claim", why)
        elif task["status"] == "done":
            raise ApiError(409, "task_not_ready", self._why_not_ready(task))

    def complete(self, actor: Actor, task_id: int, summary: str, files: list, now: float, flagged=()) -> dict:
        room_id = actor.room_id
        with self.tx():
            self._reap(now)
            self._open_room(room_id)
            task = self._task(room_id, task_id)
            if actor.kind == "peer":
                self._touch(actor.peer, now)
            self._refuse_completion(actor, task)
            self.db.execute("UPDATE tasks SET status='done', done_by=?, done_at=?, summary=?, files=?, flags=?, "
                            "assignee_id=NULL WHERE room_id=? AND id=?",
                            (actor.name, now, summary, json.dumps(files),
                             flags_json(flagged, ("summary", "files"), task["flags"]), room_id, task_id))
            unblocked, still_blocked = [], []
            for (dependent,) in self.db.execute("SELECT task_id FROM task_deps WHERE room_id=? AND depends_on=?",
                                                (room_id, task_id)).fetchall():
                if self._task(room_id, dependent)["status"] != "blocked":
                    continue
                if self._waiting_on(room_id, dependent):
                    still_blocked.append(dependent)
                else:
                    self.db.execute("UPDATE tasks SET status='ready' WHERE room_id=? AND id=?", (room_id, dependent))
                    unblocked.append(dependent)
            released = []
            if actor.kind == "peer":
                released = [r[0] for r in self.db.execute(
                    "SELECT display FROM locks WHERE holder_id=? AND reason LIKE 'auto: %'", (actor.peer["id"],))]
                self.db.execute("DELETE FROM locks WHERE holder_id=? AND reason LIKE 'auto: %'", (actor.peer["id"],))
            self._event(room_id, now, "completed", actor.name, f"task #{task_id}")
            self._changed()
            view = self._task_view(room_id, task_id)
            view["unblocked"], view["still_blocked"] = unblocked, still_blocked
            view["auto_locks_released"] = released
            if actor.kind == "peer":
                view["locks_held"] = self.db.execute("SELECT COUNT(*) FROM locks WHERE holder_id=?",
                                                     (actor.peer["id"],)).fetchone()[0]
            return view

    def release_task(self, room_id: int, task_id: int, now: float) -> dict:
        with self.tx():
            self._open_room(room_id)
            task = self._task(room_id, task_id)
            if task["status"] != "claimed":
                raise ApiError(409, "task_not_claimed", f"task #{task_id} is {task['status']}, not claimed")
            self._return_to_ready(task, self.peer_by_id(task["assignee_id"]), now, "the human released it")
            self._event(room_id, now, "task_released", "operator", f"task #{task_id}")
            self._changed()
            return self._task_view(room_id, task_id)

    # -- locks

    def _lock_view(self, row) -> dict:
        """`path` relative to the holder's project root and `abs_path` as the holder spelled it; the row's own
        `path` is the comparison key (paths.name_key)."""
        holder = self.peer_by_id(row["holder_id"])
        spelled = os.path.join(holder["root"], row["display"]) if holder and holder["root"] else row["path"]
        return with_flags({"path": row["display"], "abs_path": spelled, "holder": holder["name"] if holder else None,
                           "reason": row["reason"], "since": round(row["acquired_at"], 3)}, row)

    def _lock_row(self, room_id: int, key: str):
        return self.db.execute("SELECT * FROM locks WHERE room_id=? AND path=?", (room_id, key)).fetchone()

    def _linked_lock(self, room_id: int, real: str, peer_id: int):
        """Another peer's lock on the same file under another name (a hard link): only a file with more than
        one link can have one, so the room's locks are looked at only then."""
        identity = paths.file_id(real)
        if identity is None or identity[2] < 2:
            return None
        for row in self.db.execute("SELECT * FROM locks WHERE room_id=? AND holder_id!=?", (room_id, peer_id)):
            other = paths.file_id(self._lock_view(row)["abs_path"])
            if other is not None and other[:2] == identity[:2]:
                return row
        return None

    def lock(self, peer, path: str, reason: str, now: float, flagged=()) -> dict:
        room_id = peer["room_id"]
        with self.tx():
            self._reap(now)
            self._touch(peer, now)
            if not peer["root"]:
                raise ApiError(400, "no_project_root", "join with a project root before locking files")
            real = resolve_lock_path(peer["root"], path)
            key = paths.name_key(real, peer["root"])
            existing = self._lock_row(room_id, key)
            clash = existing if existing is not None and existing["holder_id"] != peer["id"] else \
                self._linked_lock(room_id, real, peer["id"])
            if clash is not None:
                view = self._lock_view(clash)
                raise ApiError(409, "locked", f"{view['path']} is locked by {view['holder']} since "
                                              f"{time.strftime('%H:%M:%S', time.localtime(view['since']))}; "
                                              "message them or work on another file", lock=view)
            if existing is None:
                self._refuse_more_locks(room_id, peer["id"], len(real.encode("utf-8", "surrogatepass")))
            editing = reason.startswith("auto: ")     # the edit hook's lock: its holder is writing the file now
            flags = flags_json(flagged, ("path", "reason"))
            if existing is not None and editing:    # an edit never turns a lock taken on purpose into an automatic one
                reason, flags = existing["reason"], existing["flags"]
            display = existing["display"] if existing else os.path.relpath(real, os.path.realpath(peer["root"]))
            self.db.execute("INSERT OR REPLACE INTO locks(room_id, path, display, holder_id, reason, acquired_at, flags) "
                            "VALUES(?,?,?,?,?,?,?)", (room_id, key, display, peer["id"], reason,
                                                      existing["acquired_at"] if existing else now, flags))
            if editing:
                if len(self.lock_touched) > 4096:
                    self.lock_touched.clear()
                self.lock_touched[(room_id, key)] = now
            self._changed()
            view = self._lock_view(self._lock_row(room_id, key))
            return {**view, "new_file": True} if not os.path.lexists(real) else view

    def unlock(self, actor: Actor, path: str, now: float) -> dict:
        room_id = actor.room_id
        with self.tx():
            if actor.kind == "peer":
                if not actor.peer["root"]:
                    raise ApiError(400, "no_project_root", "join with a project root before unlocking files")
                real = resolve_lock_path(actor.peer["root"], path)
                key = paths.name_key(real, actor.peer["root"])
            else:
                real = os.path.realpath(path) if os.path.isabs(path) else path
                key = paths.name_key(real, os.path.dirname(real))
            existing = self._lock_row(room_id, key)
            if existing is None:
                raise ApiError(404, "not_locked", "that path is not locked")
            if actor.kind == "peer" and existing["holder_id"] != actor.peer["id"]:
                raise ApiError(403, "not_lock_holder", f"{existing['display']} is held by "
                                                       f"{self._lock_view(existing)['holder']}; only they or the "
                                                       "human can unlock it")
            self.db.execute("DELETE FROM locks WHERE room_id=? AND path=?", (room_id, key))
            if actor.kind == "operator":
                self._event(room_id, now, "force_unlock", "operator", existing["display"])
            self._changed()
            return {"unlocked": existing["display"]}

    def report_violation(self, peer, path: str, tool: str, seconds: float, now: float) -> dict:
        """A file another peer holds changed during this peer's tool call (seen by its PostToolUse hook).
        Recorded as an event the dashboard shows, and told to the holder, unless the holder itself
        touched its lock during that call (then the change is more likely its own)."""
        with self.tx():
            self._touch(peer, now)
            if not peer["root"]:
                raise ApiError(400, "no_project_root", "join with a project root before reporting files")
            key = paths.name_key(resolve_lock_path(peer["root"], path), peer["root"])
            row = self._lock_row(peer["room_id"], key)
            if row is None or row["holder_id"] == peer["id"]:
                raise ApiError(404, "not_locked", "that path is not locked by another peer")
            view = self._lock_view(row)
            if self.lock_touched.get((peer["room_id"], key), 0) >= now - seconds - 1:
                return {"recorded": False, "holder_active": True, **view}
            detail = f"{view['path']} (locked by {view['holder']}) changed during {peer['name']}'s {tool} call"
            self._event(peer["room_id"], now, "lock_violation", peer["name"], detail)
            message_id = self.db.execute(
                "INSERT INTO messages(room_id, sender, sender_role, origin, recipient, category, content, created_at) "
                "VALUES(?,?,?,?,?,?,?,?)",
                (peer["room_id"], "control-tower", "system", "broker", view["holder"], "blocker",
                 f"{detail}, though you hold its lock. Check the file: keep or restore what you need, and talk to "
                 f"{peer['name']}. Nothing was undone automatically.", now)).lastrowid
            self.db.execute("INSERT INTO deliveries(peer_id, message_id) VALUES(?,?)", (row["holder_id"], message_id))
            self._unread.pop(row["holder_id"], None)
            self.woken.add(row["holder_id"])
            self._changed()
            return {"recorded": True, **view}

    def _refuse_more_locks(self, room_id: int, holder_id: int, path_bytes: int) -> None:
        """What one peer and one room may hold, in locks and in bytes of path: every session's hook and the
        dashboard fetch the whole list, so its size is bounded."""
        held, held_bytes = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(path AS BLOB))), 0) FROM locks "
                                           "WHERE holder_id=?", (holder_id,)).fetchone()
        if held >= LIMITS["locks_per_peer"] or held_bytes + path_bytes > LIMITS["lock_bytes_per_peer"]:
            raise ApiError(507, "too_many_locks", f"you hold {held} locks ({held_bytes} bytes of paths), the most one "
                           f"peer may is {LIMITS['locks_per_peer']} or {LIMITS['lock_bytes_per_peer']} bytes; "
                           "unlock files you are done with")
        room_held, room_bytes = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(path AS BLOB))), 0) "
                                                "FROM locks WHERE room_id=?", (room_id,)).fetchone()
        if room_held >= LIMITS["locks_per_room"] or room_bytes + path_bytes > LIMITS["lock_bytes_per_room"]:
            raise ApiError(507, "room_locks_full", f"the room holds {room_held} locks ({room_bytes} bytes of paths), "
                           f"the most one room may is {LIMITS['locks_per_room']} or {LIMITS['lock_bytes_per_room']} "
                           "bytes; ask the others to unlock files they are done with")

    def list_locks(self, room_id: int) -> list:
        return [self._lock_view(r) for r in self.db.execute("SELECT * FROM locks WHERE room_id=? ORDER BY path",
                                                            (room_id,))]

    # -- memory

    def set_memory(self, actor: Actor, key: str, value: str, now: float, flagged=()) -> dict:
        room_id = actor.room_id
        with self.tx():
            self._open_room(room_id)
            exists = self.db.execute("SELECT 1 FROM memory WHERE room_id=? AND key=?", (room_id, key)).fetchone()
            if not exists and self.db.execute("SELECT COUNT(*) FROM memory WHERE room_id=?",
                                              (room_id,)).fetchone()[0] >= LIMITS["memory_keys"]:
                raise ApiError(507, "memory_full",
                               f"shared memory holds at most {LIMITS['memory_keys']} keys; overwrite an existing key")
            self.db.execute("INSERT OR REPLACE INTO memory(room_id, key, value, updated_by, updated_at, flags) "
                            "VALUES(?,?,?,?,?,?)", (room_id, key, value, actor.name, now,
                                                    flags_json(flagged, ("key", "value"))))
            self._changed()
        return {"key": key, "bytes": len(value.encode())}

    def get_memory(self, room_id: int, key) -> dict:
        if key is not None:
            row = self.db.execute("SELECT * FROM memory WHERE room_id=? AND key=?", (room_id, key)).fetchone()
            if row is None:
                keys = [r[0] for r in self.db.execute("SELECT key FROM memory WHERE room_id=? ORDER BY key LIMIT 50",
                                                      (room_id,))]
                raise ApiError(404, "unknown_key", "no memory under that key; keys: " + (", ".join(keys) or "none"))
            rows = [row]
        else:
            rows = self.db.execute("SELECT * FROM memory WHERE room_id=? ORDER BY key", (room_id,)).fetchall()
        return {"entries": [with_flags({"key": r["key"], "value": r["value"], "updated_by": r["updated_by"],
                                        "updated_at": round(r["updated_at"], 3)}, r) for r in rows]}

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
