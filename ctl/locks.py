"""A room's file locks: one lock per file however it is spelled, bounded per peer and per room.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from ctl import paths
from ctl.config import LIMITS
from ctl.errors import ApiError
from ctl.marks import flags_json, with_flags

if TYPE_CHECKING:                       # the annotations only: Actor lives in ctl.store, which imports this
    from ctl.store import Actor


# (the column that owns a lock, whose limits, the refusal's code and words): a peer's bound first, then the room's
LOCK_BOUNDS = (("holder_id", "peer", "too_many_locks", "you hold", "one peer", "unlock files you are done with"),
               ("room_id", "room", "room_locks_full", "the room holds", "one room",
                "ask the others to unlock files they are done with"))


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


class Locks:
    """The locks rules of Store; they share its database, transactions and rooms."""

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
        for column, owner, code, held_by, whose, fix in LOCK_BOUNDS:
            held, held_bytes = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(path AS BLOB))), 0) "
                                               f"FROM locks WHERE {column}=?", (room_id if owner == "room" else holder_id,)
                                               ).fetchone()
            most, most_bytes = LIMITS[f"locks_per_{owner}"], LIMITS[f"lock_bytes_per_{owner}"]
            if held >= most or held_bytes + path_bytes > most_bytes:
                raise ApiError(507, code, f"{held_by} {held} locks ({held_bytes} bytes of paths), the most {whose} may "
                                          f"is {most} or {most_bytes} bytes; {fix}")

    def list_locks(self, room_id: int) -> list:
        return [self._lock_view(r) for r in self.db.execute("SELECT * FROM locks WHERE room_id=? ORDER BY path",
                                                            (room_id,))]
