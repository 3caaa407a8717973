"""Storage and rules: every rule of every room, each operation one SQLite transaction (WAL, synchronous=FULL).
The rules are one class per aggregate (rooms.py, peers.py, mail.py, tasks.py, locks.py, memory.py, events.py),
combined here over one database, with its opening, migrations and transactions.

A room is one project's team: its peers, messages, task graph, locks, memory, seat and pause/stop
state. Every query below names its room; nothing of one room is reachable from another.
Nothing here knows about HTTP; routes in api.py call these methods with validated arguments.
"""
import contextlib
import os
import sqlite3
import time
from collections import deque
from dataclasses import dataclass

from ctl.config import BUSY_WAIT_MS, BUSY_WINDOW, Settings
from ctl.common import StateError
from ctl.errors import ApiError
from ctl.events import Events
from ctl.locks import Locks
from ctl.mail import Mail
from ctl.memory import Memory
from ctl.peers import Peers
from ctl.retention import Retention
from ctl.rooms import Rooms
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


class Store(Rooms, Peers, Mail, Tasks, Locks, Memory, Events):
    """Every rule of every room, one class per aggregate in its own module: rooms, peers, mail, tasks, locks,
    memory and events; here the database they share. Operations run in `tx()`: a transaction of their own, or a
    savepoint inside the event loop's batch, so one request's failure rolls back only itself."""

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

    def checkpoint(self) -> None:
        """From the loop when it has nothing to do: commits since the last time are folded back into the
        database, and the WAL restarts from its beginning, so the next commits overwrite it."""
        if self.unfolded:
            self.db.execute("PRAGMA wal_checkpoint(RESTART)")
            self.unfolded = False
