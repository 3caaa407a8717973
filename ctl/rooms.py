"""Rooms: one project's team each, opened by its first join; paused, stopped, woken or archived by the human;
and the snapshot of one the dashboard draws.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
import itertools

from ctl.config import LIMITS
from ctl.errors import ApiError


class Rooms:
    """The room rules of Store; they share its database and transactions."""

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
        view["messages"] = [self._message_view(r) for r in rows]
        # While paused, the agents' messages not yet read are held, those sent before the pause too: which of the
        # room's latest 500 (as many as the page keeps) are, so it marks those shown already as well as new ones.
        # Bounded by those 500 whatever the backlog: each looks up its own deliveries.
        view["held"] = [r[0] for r in self.db.execute(
            "SELECT m.id FROM (SELECT id, origin FROM messages WHERE room_id=? ORDER BY id DESC LIMIT 500) m "
            "WHERE m.origin = 'agent' AND EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id "
            "AND d.acked_at IS NULL) ORDER BY m.id", (room_id,))] if room["state"] == "paused" else []
        view["open_blockers"] = self._open_blockers(room_id)
        events = self.db.execute("SELECT * FROM events WHERE (room_id=? OR room_id IS NULL) AND id > ? "
                                 "ORDER BY id DESC LIMIT 200", (room_id, after_event))
        view["events"] = [{"id": r["id"], "at": round(r["at"], 3), "kind": r["kind"], "actor": r["actor"],
                           "detail": r["detail"], "count": r["count"]} for r in events]
        return view
