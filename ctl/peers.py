"""A room's peers: joins and leases, their reaping, the architect seat, and the human's kicks and hand-overs.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
import time

from ctl.config import LIMITS
from ctl.errors import ApiError
from ctl.marks import flags_json, with_flags
from ctl.names import name_skeleton, reads_as_authority

SEAT_REVOKED = 0        # rooms.seat_peer: NULL never had an architect, 0 revoked or vacated, else the holder's peer id


def _stopped():
    return ApiError(423, "room_stopped", "the human stopped the room; stop working and wait for the human")


class Peers:
    """The peer and seat rules of Store; they share its database, transactions and rooms."""

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
