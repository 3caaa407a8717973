"""Retention, room by room: one room's traffic never erases another room's history, an archived room keeps
all of its messages, and a flood of refusals from one caller makes one counted row a minute.

The store says which rooms wrote (`touched`); each tick of the loop prunes a few of them within a small time
budget, so no pass holds the loop however many rooms are busy."""
import time

from ctl.config import EVENTS_KEPT

STEP_BUDGET = 0.01          # seconds of pruning per tick of the loop


class Retention:
    def __init__(self):
        self.touched = set()        # room ids (None: the record of unauthenticated callers) written since pruned
        self.counters = {}          # (room id, kind, actor, minute) -> the event row counting them

    def counted_event(self, db, room_id, kind: str, actor: str, detail: str, now: float) -> None:
        """One row per room, kind, actor and minute, its count going up: a flood cannot push out other events."""
        minute = int(now // 60) * 60
        key = (room_id, kind, actor, minute)
        row_id = self.counters.get(key)
        if row_id is not None and db.execute("UPDATE events SET count=count+1, detail=? WHERE id=?",
                                             (detail, row_id)).rowcount:
            return
        if any(k[3] != minute for k in self.counters):      # counters of past minutes are done
            self.counters = {k: v for k, v in self.counters.items() if k[3] == minute}
        self.counters[key] = db.execute("INSERT INTO events(room_id, at, kind, actor, detail) VALUES(?,?,?,?,?)",
                                        (room_id, minute, kind, actor, detail)).lastrowid
        self.touched.add(room_id)

    def step(self, db, archived: set, keep_messages: int) -> None:
        """Prune touched rooms until the budget is spent; the rest wait for the next tick."""
        deadline = time.perf_counter() + STEP_BUDGET
        while self.touched and time.perf_counter() < deadline:
            room_id = self.touched.pop()
            _trim(db, "events", room_id, EVENTS_KEPT)
            if room_id is not None and room_id not in archived:
                _trim(db, "messages", room_id, keep_messages)


def _trim(db, table: str, room_id, keep: int) -> None:
    """Keep the room's newest `keep` rows of `table`; messages still unread by someone always stay."""
    low = db.execute(f"SELECT MIN(id) FROM {table} WHERE room_id IS ?", (room_id,)).fetchone()[0]
    high = db.execute(f"SELECT MAX(id) FROM {table} WHERE room_id IS ?", (room_id,)).fetchone()[0]
    if low is None or high - low < keep:            # one index probe each; ids are shared by every room, so a span
        return                                      # this short holds fewer rows than `keep`
    row = db.execute(f"SELECT id FROM {table} WHERE room_id IS ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                     (room_id, keep)).fetchone()
    if row is None:
        return
    if table == "events":
        db.execute("DELETE FROM events WHERE room_id IS ? AND id <= ?", (room_id, row[0]))
        return
    db.execute("DELETE FROM deliveries WHERE acked_at IS NOT NULL AND message_id IN "
               "(SELECT id FROM messages WHERE room_id=? AND id <= ?)", (room_id, row[0]))
    db.execute("DELETE FROM messages WHERE room_id=? AND id <= ? AND NOT EXISTS "
               "(SELECT 1 FROM deliveries d WHERE d.message_id = messages.id)", (room_id, row[0]))
