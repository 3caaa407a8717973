"""Day-thirty operations on a state directory: backup, restore, export, and a doctor that says what to fix.

They read the database directly (a read-only connection beside the running broker, which WAL allows),
so a large export never holds up the broker's loop.
"""
import json
import os
import socket
import sqlite3
import stat
import sys
import time

from ctl import common, user_command
from ctl.store import SCHEMA_VERSION


class OperationError(Exception):
    """The operation cannot be done as asked; the message says what to do."""


def db_path(state_dir: str) -> str:
    return os.path.join(state_dir, "broker.db")


def _read_only(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise OperationError(f"{path} does not exist; start the broker once ({user_command('launch')})")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def _private_file(path: str):
    """Create a new file only this user can read; refuse to overwrite what is there or to follow a link."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise OperationError(f"the folder {folder} does not exist; create it first or name a file in an existing one")
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise OperationError(f"{path} already exists (a file or a link); name a new file")
    except PermissionError:
        raise OperationError(f"you may not write in {folder}; name a file in a folder of yours")


def _new_folder(path: str) -> None:
    """A folder of ours to write into: made 0700, or an existing real folder (never a link to one)."""
    if os.path.islink(path):
        raise OperationError(f"{path} is a symbolic link; export into a real folder")
    os.makedirs(path, mode=0o700, exist_ok=True)


# ---------------------------------------------------------------- backup and restore


def backup(state_dir: str, target: str) -> str:
    """An online, consistent copy made with SQLite's backup API while agents keep writing."""
    target = os.path.abspath(target)
    os.close(_private_file(target))
    source = _read_only(db_path(state_dir))
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        verdict = copy.execute("PRAGMA integrity_check").fetchone()[0]
        copy.execute("PRAGMA journal_mode=DELETE")
    finally:
        copy.close()
        source.close()
    if verdict != "ok":
        raise OperationError(f"the copy failed its integrity check ({verdict}); {target} is not a good backup")
    return f"Backup written to {target} ({os.path.getsize(target):,} bytes, integrity ok, mode 0600)."


def restore(state_dir: str, source: str, broker_pid) -> str:
    """Bring a backup back with the broker stopped; the database it replaces is kept beside it."""
    if broker_pid is not None:
        raise OperationError(f"the broker (pid {broker_pid}) is running; stop it first: {user_command('launch')} --stop")
    try:
        check = sqlite3.connect(f"file:{os.path.abspath(source)}?mode=ro", uri=True)
        verdict = check.execute("PRAGMA integrity_check").fetchone()[0]
        version = check.execute("PRAGMA user_version").fetchone()[0]
        check.close()
    except sqlite3.Error as exc:
        raise OperationError(f"{source} is not a readable database ({exc})")
    if verdict != "ok":
        raise OperationError(f"{source} fails its integrity check ({verdict}); nothing was changed")
    if version > SCHEMA_VERSION:
        raise OperationError(f"{source} is from a newer Control Tower Lite (schema {version}); nothing was changed")
    common.ensure_state_dir(state_dir)
    live = db_path(state_dir)
    staged = live + ".restoring"
    with open(source, "rb") as reader, os.fdopen(_private_file(staged), "wb") as writer:
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    kept = None
    if os.path.exists(live):
        kept = f"{live}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(live, kept)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(live + suffix):
            os.rename(live + suffix, (kept or live) + suffix)
    os.replace(staged, live)
    return f"Restored {source} into {live}" + (f"; the database it replaced is kept as {kept}" if kept else "") + \
        f". Start the broker: {user_command('launch')}"


# ---------------------------------------------------------------- export


def _rows(db, sql: str, args=()) -> list:
    return [dict(row) for row in db.execute(sql, args)]


def export(state_dir: str, out_dir: str, room_name=None) -> str:
    """Each room's history as JSON Lines (messages, tasks, memory, events) and one Markdown transcript."""
    db = _read_only(db_path(state_dir))
    try:
        rooms = _rows(db, "SELECT * FROM rooms ORDER BY id")
        if room_name is not None:
            rooms = [r for r in rooms if r["name"] == room_name]
            if not rooms:
                names = ", ".join(sorted({r["name"] for r in _rows(db, "SELECT name FROM rooms")})) or "none"
                raise OperationError(f"no room named {room_name}; rooms: {names}")
        _new_folder(out_dir)
        written = []
        for room in rooms:
            folder = os.path.join(out_dir, f"{room['name']}-{room['id']}")
            _new_folder(folder)
            if os.listdir(folder):
                raise OperationError(f"{folder} already holds an export; export into a new folder")
            parts = {
                "messages": _rows(db, "SELECT id, sender, sender_role, origin, recipient, category, content, created_at, "
                                      "flag FROM messages WHERE room_id=? ORDER BY id", (room["id"],)),
                "tasks": _rows(db, "SELECT id, title, description, status, created_by, created_at, done_by, done_at, "
                                   "summary, files, history FROM tasks WHERE room_id=? ORDER BY id", (room["id"],)),
                "memory": _rows(db, "SELECT key, value, updated_by, updated_at FROM memory WHERE room_id=? ORDER BY key",
                                (room["id"],)),
                "events": _rows(db, "SELECT at, kind, actor, detail, count FROM events WHERE room_id=? ORDER BY id",
                                (room["id"],)),
            }
            deps = {}
            for task_id, dependency in db.execute("SELECT task_id, depends_on FROM task_deps WHERE room_id=? "
                                                  "ORDER BY depends_on", (room["id"],)):
                deps.setdefault(task_id, []).append(dependency)
            for task in parts["tasks"]:
                task["depends_on"] = deps.get(task["id"], [])
                task["files"] = json.loads(task["files"] or "[]")
                task["history"] = json.loads(task["history"])
            for name, rows in parts.items():
                _write(os.path.join(folder, f"{name}.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            _write(os.path.join(folder, "transcript.md"), transcript(room, parts))
            written.append(folder)
    finally:
        db.close()
    return "Exported " + ", ".join(written) if written else "No rooms to export."


def _write(path: str, text: str) -> None:
    """A new file: an export never overwrites an earlier one, nor writes through a link."""
    with os.fdopen(_private_file(path), "w", encoding="utf-8") as handle:
        handle.write(text)


def _when(stamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _quote(text: str) -> str:
    """Peer text as a Markdown block quote: it cannot turn into headings or structure of the transcript."""
    return "\n".join("> " + line for line in (text or "").splitlines() or [""])


def transcript(room: dict, parts: dict) -> str:
    done = sum(1 for t in parts["tasks"] if t["status"] == "done")
    lines = [f"# Room {room['name']}", "",
             f"- Project: `{room['root'] or 'no project root'}`",
             f"- Opened {_when(room['created_at'])}" + (f", archived {_when(room['archived_at'])}"
                                                         if room["archived_at"] else ", still open"),
             f"- Tasks: {done} of {len(parts['tasks'])} done; messages: {len(parts['messages'])}", "", "## Tasks", ""]
    for task in parts["tasks"]:
        after = f" (after {', '.join(f'#{d}' for d in task['depends_on'])})" if task["depends_on"] else ""
        lines.append(f"### #{task['id']} {task['status']}{after}")
        lines.append(_quote(task["title"]))
        if task["status"] == "done":
            lines += ["", f"Done by {task['done_by']} at {_when(task['done_at'])}:", _quote(task["summary"])]
            if task["files"]:
                lines.append("Files: " + ", ".join(f"`{f}`" for f in task["files"]))
        lines.append("")
    lines += ["## Decisions (shared memory)", ""]
    for entry in parts["memory"]:
        lines += [f"- `{entry['key']}` by {entry['updated_by']} at {_when(entry['updated_at'])}:", _quote(entry["value"]), ""]
    lines += ["## Messages", ""]
    for message in parts["messages"]:
        flag = f", flagged ({message['flag']})" if message["flag"] else ""
        lines += [f"**#{message['id']}** {_when(message['created_at'])} {message['sender']} ({message['sender_role']}, "
                  f"{message['origin']}) to {message['recipient']}, {message['category']}{flag}:", _quote(message["content"]), ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- doctor


def what_answers(port: int, state_dir: str) -> str:
    """Our broker, another program, or nothing: never sends a secret to find out."""
    if common.broker_running(port, state_dir):
        return "ours"
    try:
        with socket.create_connection((common.HOST, port), timeout=1) as sock:
            sock.sendall(f"GET /health HTTP/1.0\r\nHost: {common.HOST}:{port}\r\n\r\n".encode())
            sock.settimeout(1)
            head = sock.recv(4096)
    except ConnectionRefusedError:
        return "nothing"
    except OSError:
        return "something that does not speak HTTP"
    first = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    server = next((line.split(b":", 1)[1].strip().decode("ascii", "replace")
                   for line in head.split(b"\r\n") if line.lower().startswith(b"server:")), None)
    if not first.startswith("HTTP/"):
        return "something that does not speak HTTP"
    if head.endswith(b'{"ok":true}') and server is None:
        return "a Control Tower broker of another state directory"
    return f"another HTTP server ({server or first})"


def doctor(port: int, state_dir: str, registrations) -> list:
    """(ok, what, how to fix) for each thing that must hold."""
    checks = []
    version = sys.version_info
    checks.append((version >= (3, 10), f"Python {version.major}.{version.minor}.{version.micro}",
                   "install Python 3.10 or newer"))
    try:
        common.ensure_state_dir(state_dir, create=False)
        for name in (common.HMAC_KEY_FILE, common.JOIN_SECRET_FILE, common.OPERATOR_TOKEN_FILE,
                     common.OBSERVER_TOKEN_FILE, "broker.db"):
            common.check_private_file(os.path.join(state_dir, name))
        for folder, folders, files in os.walk(state_dir):      # every folder 0700 and every file 0600, at any depth
            for name in folders:
                common.ensure_state_dir(os.path.join(folder, name), create=False)
            for name in files:
                path = os.path.join(folder, name)
                if stat.S_ISSOCK(os.lstat(path).st_mode) and not os.lstat(path).st_mode & 0o077:
                    continue                                    # a session's private socket
                common.check_private_file(path)
        checks.append((True, f"state directory {state_dir}: private (0700, files 0600)", ""))
    except common.StateError as exc:
        checks.append((False, f"state directory {state_dir}: {exc}", str(exc).rpartition("; ")[2]))
    try:
        db = _read_only(db_path(state_dir))
        verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        schema = db.execute("PRAGMA user_version").fetchone()[0]
        db.close()
        checks.append((verdict == "ok", f"database integrity: {verdict} (schema {schema})",
                       f"restore a backup: {user_command('launch')} --stop, then --restore FILE"))
    except (OperationError, sqlite3.Error) as exc:
        checks.append((False, f"database: {exc}", f"start the broker once: {user_command('launch')}"))
    wal = db_path(state_dir) + "-wal"
    size = os.path.getsize(wal) if os.path.exists(wal) else 0
    checks.append((size < 64 << 20, f"write-ahead log: {size:,} bytes",
                   "a process holds an old read open; stop stray sqlite3 shells on broker.db"))
    answer = what_answers(port, state_dir)
    checks.append((answer == "ours", f"port {port}: {'our broker answers' if answer == 'ours' else answer + ' answers'}",
                   f"start it: {user_command('launch')}" if answer == "nothing" else
                   "stop that program, or use another port everywhere (CTL_PORT, --port)"))
    found = list(registrations)
    checks.append((bool(found), "registered with: " + ("; ".join(found) or "no client"),
                   f"register the server: {user_command('install')}"))
    return checks
