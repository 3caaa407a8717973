"""A room's events, and pruning: gone peers' unread mail, and each room's oldest events and read messages
(ctl/retention.py).

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
from ctl.config import GONE_PEER_DAYS


class Events:
    """The events and pruning of Store; they share its database, transactions and retention."""

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
