"""A room's task graph: tasks, their dependencies, claims, completions and pages of listings.

A part of Store (ctl/store.py), which combines one such class per aggregate over one database."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ctl.config import LIMITS, TASK_STATUSES
from ctl.errors import ApiError
from ctl.marks import flags_json, with_flags

if TYPE_CHECKING:                       # the annotations only: Actor lives in ctl.store, which imports this
    from ctl.store import Actor


OPEN_STATUSES = tuple(s for s in TASK_STATUSES if s != "done")
TASK_VIEW_COLUMNS = "id, title, description, status, assignee_id, done_by, summary, files, history, flags"
# A page of one status. The status is spelled out, not bound: a bound value compared with a column that a
# partial index (tasks_done) tests makes SQLite prepare the statement anew on every run, about 15 µs each.
TASK_PAGE_SQL = {s: f"SELECT {TASK_VIEW_COLUMNS} FROM tasks WHERE room_id=? AND status='{s}' AND id>? "
                    "ORDER BY id LIMIT ?" for s in TASK_STATUSES}


def _json_list(text) -> list:
    """A stored JSON list; most are empty, and the parser is not free."""
    return json.loads(text) if text and text != "[]" else []


class Tasks:
    """The tasks rules of Store; they share its database, transactions and rooms."""

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

    def _return_to_ready(self, task, holder, now: float, why: str) -> None:
        """The next claimer learns who held it, for how long, and what they last said they were doing."""
        history = json.loads(task["history"])
        history.append({"holder": holder["name"] if holder else None, "why": why,
                        "held_seconds": round(now - (task["claimed_at"] or now)),
                        "last_status": holder["summary"] if holder else ""})
        self.db.execute("UPDATE tasks SET status='ready', assignee_id=NULL, claimed_at=NULL, history=? "
                        "WHERE room_id=? AND id=?", (json.dumps(history[-5:]), task["room_id"], task["id"]))

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
