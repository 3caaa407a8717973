"""A room's mail: sends to a peer, the architect's seat or everyone; inboxes read, acknowledged and counted.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ctl.errors import ApiError

if TYPE_CHECKING:                       # the annotations only: Actor lives in ctl.store, which imports this
    from ctl.store import Actor


HELD_BY_A_PAUSE = "AND m.origin != 'agent'"     # while a room is paused, only the human's messages are readable
# A peer's unread mail, oldest first, by whether its room is paused (index: deliveries_unread).
INBOX_SQL = {held: "SELECT d.id AS delivery_id, m.* FROM deliveries d JOIN messages m ON m.id = d.message_id "
                   f"WHERE d.peer_id=? AND d.acked_at IS NULL {HELD_BY_A_PAUSE if held else ''} ORDER BY d.id LIMIT ?"
             for held in (False, True)}


class Mail:
    """The mail rules of Store; they share its database, transactions and rooms."""

    def send(self, actor: Actor, to: str, content: str, category: str, flag, now: float, checked=None) -> dict:
        """`checked`: the recipients check_send found a moment ago, in the same request (nothing ran between)."""
        room_id = actor.room_id
        with self.tx():                             # recipients are checked alive one by one: no sweep needed
            self._open_room(room_id)
            state = self.room_state(room_id)
            sender_id = actor.peer["id"] if actor.peer is not None else None
            if sender_id is not None:
                self._touch(actor.peer, now)
            recipients = list(checked) if checked is not None else self._recipients(room_id, to, sender_id, now)
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

    def check_send(self, actor: Actor, to: str, now: float) -> list:
        """What a send is refused for before its text is screened: no such recipient, the rate limit. Returns
        the recipients, for the send."""
        sender_id = actor.peer["id"] if actor.peer is not None else None
        recipients = self._recipients(actor.room_id, to, sender_id, now)
        if actor.kind == "peer":
            self.limiter.check(sender_id, max(1, len(recipients)), now)
        return recipients

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
        rows = self.db.execute(INBOX_SQL[state == "paused"], (peer_id, limit)).fetchall()
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
        readable = HELD_BY_A_PAUSE if held else ""
        row = self.db.execute(
            "SELECT COUNT(*) AS n, MAX(d.id) AS latest FROM deliveries d JOIN messages m ON m.id=d.message_id "
            f"WHERE d.peer_id=? AND d.acked_at IS NULL {readable}", (peer_id,)).fetchone()
        if not row["n"]:
            return {"unread": 0}
        latest = self.db.execute("SELECT m.sender, m.category FROM deliveries d JOIN messages m ON m.id=d.message_id "
                                 "WHERE d.id=?", (row["latest"],)).fetchone()
        return {"unread": row["n"], "latest_from": latest["sender"], "latest_category": latest["category"]}

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
