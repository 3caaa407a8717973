"""A room's shared memory: the decisions its architect records, as keys and values.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ctl.config import LIMITS
from ctl.errors import ApiError
from ctl.marks import flags_json, with_flags

if TYPE_CHECKING:                       # the annotations only: Actor lives in ctl.store, which imports this
    from ctl.store import Actor


class Memory:
    """The memory rules of Store; they share its database, transactions and rooms."""

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
