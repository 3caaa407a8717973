"""Rooms: one broker, one room per project; nothing of one room reachable from another."""
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import unittest

from helpers import ROOT, BrokerProcess, McpSession
from ctl import store  # noqa: E402  (helpers puts the checkout on the path)
from test_mcp_server import project_dir

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "v1-broker.db")
LAUNCH = os.path.join(ROOT, "launch.py")


class TwoTeamsTest(unittest.TestCase):
    """Two teams, each an architect and two workers driven over stdio, in two projects at once."""

    def setUp(self):
        self.broker = BrokerProcess(env={"CTL_RATE_LIMIT": "1000"}).start()
        self.sessions = []

    def tearDown(self):
        for session in self.sessions:
            session.dispose()
        self.broker.cleanup()

    def team(self, project):
        sessions = {}
        for name in ("lead", "w1", "w2"):
            folder = os.path.join(project, name)       # each in its own sub-folder of the one git project
            os.makedirs(folder, exist_ok=True)
            session = McpSession(self.broker, folder, name=name)
            session.initialize()
            self.sessions.append(session)
            sessions[name] = session
        sessions["lead"].ok("join", {"role": "architect"})
        for name in ("w1", "w2"):
            sessions[name].ok("join", {})
        return sessions

    def run_graph(self, team, label):
        lead = team["lead"]
        first = lead.ok("create_task", {"title": f"{label} schema"})
        lead.ok("create_task", {"title": f"{label} api", "depends_on": [first["id"]]})
        lead.ok("set_memory", {"key": "stack", "value": f"{label} stack"})
        for worker in ("w1", "w2"):
            while True:
                result = team[worker].call("claim_task", {})
                if result["isError"]:
                    break
                task = result["structuredContent"]
                team[worker].ok("lock_file", {"path": f"{label}-{task['id']}.py"})
                team[worker].ok("complete_task", {"task_id": task["id"], "summary": f"{label} done {task['id']}"})

    def test_two_teams_never_see_each_other(self):
        alpha, beta = project_dir("alpha"), project_dir("beta")
        a, b = self.team(alpha), self.team(beta)
        threads = [threading.Thread(target=self.run_graph, args=(a, "alpha")),
                   threading.Thread(target=self.run_graph, args=(b, "beta"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        a["w1"].ok("lock_file", {"path": "shared-name.py", "reason": "alpha holds it"})
        self.assertFalse(b["w1"].call("lock_file", {"path": "shared-name.py"})["isError"],
                         "the same relative path in another project is another file")
        for team, label, other in ((a, "alpha", "beta"), (b, "beta", "alpha")):
            tasks = team["w2"].ok("list_tasks", {})
            self.assertEqual(tasks["counts"]["done"], 2)
            self.assertTrue(all(label in t["title"] for t in tasks["tasks"]), tasks)
            self.assertEqual(team["w1"].ok("get_memory", {})["entries"][0]["value"], f"{label} stack")
            joined = team["w2"].ok("join", {})
            self.assertEqual(sorted(p["name"] for p in joined["peers"]), ["lead", "w1"], "only its own room's peers")
            self.assertEqual(joined["room_name"], label)
        sent = a["w1"].ok("send", {"to": "*", "content": "alpha broadcast"})
        self.assertEqual(sorted(sent["delivered_to"]), ["lead", "w2"], "* is everyone in this room only")
        self.assertEqual(b["w2"].ok("check", {})["messages"], [], "no broadcast crosses rooms")
        to_lead = b["w1"].ok("send", {"to": "architect", "content": "for whoever plans beta"})
        self.assertEqual(to_lead["delivered_to"], ["lead"])
        self.assertEqual(b["lead"].ok("check", {})["messages"][0]["content"], "for whoever plans beta")
        self.assertEqual([m["content"] for m in a["lead"].ok("check", {})["messages"]], ["alpha broadcast"])

        rooms = {r["name"]: r for r in self.broker.rooms()}
        self.assertEqual(set(rooms), {"alpha", "beta"})
        self.assertEqual(rooms["alpha"]["root"], os.path.realpath(alpha))
        self.broker.operator(rooms["alpha"]["id"]).ok("POST", "/operator/pause", {})
        held = a["w1"].ok("send", {"to": "lead", "content": "held while paused"})
        self.assertIn("held", held)
        self.assertNotIn("held", b["w1"].ok("send", {"to": "lead", "content": "beta runs on"}))
        self.assertEqual(b["lead"].ok("check", {})["messages"][0]["content"], "beta runs on")
        self.assertEqual(a["lead"].ok("check", {})["messages"], [], "alpha is paused, beta is not")

    def test_every_route_is_scoped_to_the_callers_room(self):
        alpha, beta = project_dir("alpha"), project_dir("beta")
        open(os.path.join(alpha, "a.py"), "w").close()
        mine = self.broker.join("ann", role="architect", root=alpha)
        theirs = self.broker.join("ann", role="architect", root=beta)      # the same name in another room
        worker = self.broker.join("bob", root=beta)
        task = mine.ok("POST", "/tasks", {"title": "alpha only"})
        mine.ok("POST", "/memory", {"key": "secret-plan", "value": "alpha"})
        mine.ok("POST", "/locks", {"path": "a.py"})
        mine.send("*", "nobody else")
        self.assertEqual(theirs.ok("GET", "/tasks")["tasks"], [])
        self.assertEqual(theirs.ok("GET", "/memory")["entries"], [])
        self.assertEqual(theirs.ok("GET", "/locks")["locks"], [])
        self.assertEqual([p["name"] for p in theirs.ok("GET", "/peers")["peers"]], ["ann", "bob"])
        self.assertEqual(theirs.call("GET", "/memory?key=secret-plan")[0], 404)
        self.assertEqual(worker.call("POST", "/tasks/claim", {"task_id": task["id"]})[0], 404)
        self.assertEqual(theirs.call("POST", "/tasks/update", {"task_id": task["id"], "title": "x"})[0], 404)
        self.assertEqual(worker.call("POST", "/tasks/complete", {"task_id": task["id"], "summary": "x"})[0], 404)
        self.assertEqual(worker.call("POST", "/locks/release", {"path": os.path.join(alpha, "a.py")})[0], 400)
        self.assertEqual(worker.call("POST", "/locks", {"path": os.path.join(alpha, "a.py")})[0], 400,
                         "a lock path resolves inside the caller's own project")
        self.assertEqual(worker.read()["messages"], [])
        status, data = worker.call("GET", "/tasks?room=1")
        self.assertEqual((status, data["error"]["code"]), (400, "room_in_body"), "a peer cannot name a room")
        status, data = worker.call("POST", "/messages", {"to": "ann", "content": "hi", "room": 1})
        self.assertEqual(status, 400)
        self.assertEqual(worker.send("ann", "hello, beta's ann")[1]["delivered_to"], ["ann"])
        self.assertEqual([m["from"] for m in theirs.read()["messages"]], ["bob"])
        self.assertEqual(mine.read()["messages"], [], "alpha's ann got nothing of beta's")
        for path in ("/state", "/tasks", "/locks", "/memory", "/peers"):
            status, data = self.broker.request("GET", path, token=self.broker.secret("operator.token"))
            self.assertEqual((status, data["error"]["code"]), (400, "room_required"), path)
        alpha_id = next(r["id"] for r in self.broker.rooms() if r["name"] == "alpha")
        beta_view = self.broker.operator(alpha_id + 1 if alpha_id == 1 else 1).ok("GET", "/state")
        self.assertEqual(beta_view["room"]["name"], "beta")
        self.assertNotIn("alpha only", str(beta_view))

    def test_reserved_and_invalid_default_names_still_join(self):
        server = project_dir("server")
        session = McpSession(self.broker, server)
        self.sessions.append(session)
        session.initialize()
        result = session.call("join", {})
        self.assertFalse(result["isError"], result)
        self.assertEqual(result["structuredContent"]["name"], "server-2")
        self.assertIn("server was taken or reserved", result["content"][0]["text"])
        self.assertFalse(session.call("list_tasks", {})["isError"], "every tool works under the new name")
        named = McpSession(self.broker, server, name="architect")
        self.sessions.append(named)
        named.initialize()
        self.assertEqual(named.ok("join", {})["name"], "architect-2")
        refused = named.call("join", {"name": "operator"})
        self.assertTrue(refused["isError"])
        self.assertIn("CTL_NAME", refused["content"][0]["text"], "a refusal says how to choose a name")
        self.assertEqual(named.ok("list_tasks", {})["counts"]["ready"], 0, "a refused join leaves the session as it was")
        odd = project_dir("...---")
        third = McpSession(self.broker, odd)
        self.sessions.append(third)
        third.initialize()
        self.assertEqual(third.ok("join", {})["name"], "peer")

    def test_ctl_room_shares_a_room_across_folders_on_purpose(self):
        one, two = project_dir("one"), project_dir("two")
        first = McpSession(self.broker, one, env={"CTL_ROOM": "shared"})
        second = McpSession(self.broker, two, env={"CTL_ROOM": "shared"})
        self.sessions += [first, second]
        for session in (first, second):
            session.initialize()
        self.assertEqual(first.ok("join", {})["room_name"], "shared")
        self.assertIn("one", [p["name"] for p in second.ok("join", {})["peers"]])

    def test_archive_then_start_again(self):
        project = project_dir("shop")
        old = McpSession(self.broker, project, name="planner")
        self.sessions.append(old)
        old.initialize()
        old.ok("join", {"role": "architect"})
        old.ok("create_task", {"title": "old work"})
        old.ok("set_memory", {"key": "k", "value": "old decision"})
        result = subprocess.run([sys.executable, LAUNCH, "--archive-room", "shop"], env=self.broker.env,
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        told = old.call("list_tasks", {})
        self.assertTrue(told["isError"])
        self.assertIn("archived", told["content"][0]["text"])
        new = McpSession(self.broker, project, name="planner2")
        self.sessions.append(new)
        new.initialize()
        joined = new.ok("join", {"role": "architect"})
        self.assertEqual(joined["role"], "architect", "the fresh room has a free seat")
        self.assertEqual(new.ok("list_tasks", {})["counts"], {"blocked": 0, "ready": 0, "claimed": 0, "done": 0})
        self.assertEqual(new.ok("get_memory", {})["entries"], [])
        rooms = self.broker.rooms()
        self.assertEqual([(r["name"], r["archived"]) for r in rooms], [("shop", False), ("shop", True)])
        archived = self.broker.operator(rooms[1]["id"])
        self.assertEqual(archived.ok("GET", "/tasks")["tasks"][0]["title"], "old work", "history stays readable")
        self.assertEqual(archived.call("POST", "/tasks", {"title": "x"})[0], 409, "and read-only")
        again = old.call("join", {})
        self.assertFalse(again["isError"], "an explicit join starts over in the open room")
        self.assertEqual(again["structuredContent"]["room_name"], "shop")


class MigrationTest(unittest.TestCase):
    def test_a_v1_database_migrates_with_every_row(self):
        broker = BrokerProcess()
        os.makedirs(broker.state_dir, mode=0o700)
        db_path = os.path.join(broker.state_dir, "broker.db")
        shutil.copy(FIXTURE, db_path)
        os.chmod(db_path, 0o600)
        old = sqlite3.connect(FIXTURE)
        counts = {t: old.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("peers", "messages", "deliveries", "tasks", "task_deps", "locks", "memory", "events")}
        unread = old.execute("SELECT COUNT(*) FROM deliveries WHERE acked=0").fetchone()[0]
        old.close()
        db = store.open_database(db_path)        # the migration alone, before the broker reaps old leases
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION)
        for table, count in counts.items():
            scope = "1" if table == "deliveries" else "room_id=1"
            self.assertEqual(db.execute(f"SELECT COUNT(*) FROM {table} WHERE {scope}").fetchone()[0], count, table)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM deliveries WHERE acked_at IS NULL").fetchone()[0], unread)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        db.close()
        broker.start()
        try:
            room = broker.rooms()[0]
            self.assertTrue(room["name"].startswith("ctl-v1-project"), room)
            self.assertEqual((room["state"], room["tasks_total"], room["tasks_done"]), ("paused", 3, 1))
            state = broker.operator().ok("GET", "/state")
            self.assertEqual(state["room"]["seat"], "planner")
            self.assertEqual(state["memory"][0]["value"], "sqlite, WAL")
            self.assertEqual(state["locks"], [], "the lock of a peer whose lease ran out while stopped is freed")
            self.assertEqual({t["title"] for t in state["tasks"]["tasks"]},
                             {"Design the schema", "Build the API", "Write tests"})
        finally:
            broker.cleanup()

    def migrated(self, version: int, *statements):
        """A database of this code made to look like `version` by the statements, then opened (and migrated)."""
        folder = tempfile.mkdtemp(prefix=f"ctl-v{version}-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, "broker.db")
        db = store.open_database(path)
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={version}")
        db.close()
        db = store.open_database(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], store.SCHEMA_VERSION)
        return db

    def test_a_v2_seat_held_by_a_name_passes_to_that_peer(self):
        db = self.migrated(2, *(f"INSERT INTO rooms(id, key, name, created_at) VALUES({room}, 'name:{name}', '{name}', 0)"
                                for room, name in ((1, "one"), (2, "two"), (3, "three"))),
                           "INSERT INTO peers(id, room_id, name, role, generation, status, joined_at, last_seen) "
                           "VALUES(7, 1, 'lead', 'architect', 1, 'dead', 0, 0)",
                           "ALTER TABLE rooms ADD COLUMN seat TEXT",
                           "UPDATE rooms SET seat = CASE id WHEN 1 THEN 'lead' WHEN 2 THEN '' END",
                           "ALTER TABLE rooms DROP COLUMN seat_peer", "ALTER TABLE peers DROP COLUMN agent")
        self.assertEqual([tuple(r) for r in db.execute("SELECT id, seat_peer FROM rooms ORDER BY id")],
                         [(1, 7), (2, 0), (3, None)], "held, revoked, never had")
        self.assertIn("agent", [r[1] for r in db.execute("PRAGMA table_info(peers)")])

    def test_a_v3_room_wakes_its_sessions(self):
        db = self.migrated(3, "INSERT INTO rooms(id, key, name, created_at) VALUES(1, 'name:r', 'r', 0)",
                           "ALTER TABLE rooms DROP COLUMN wake")
        self.assertEqual(db.execute("SELECT wake FROM rooms").fetchall()[0][0], "on")

    def test_a_v4_database_keeps_its_rows_and_gains_the_filters_marks(self):
        db = self.migrated(4, "INSERT INTO rooms(id, key, name, created_at) VALUES(1, 'name:r', 'r', 0)",
                           "INSERT INTO tasks(room_id, id, title, description, status, created_by, created_at) "
                           "VALUES(1, 1, 'kept', '', 'ready', 'lead', 0)",
                           *(f"ALTER TABLE {table} DROP COLUMN flags" for table in ("peers", "tasks", "locks", "memory")))
        self.assertEqual(tuple(db.execute("SELECT title, flags FROM tasks").fetchone()), ("kept", None))
        for table in ("peers", "tasks", "locks", "memory"):
            self.assertIn("flags", [r[1] for r in db.execute(f"PRAGMA table_info({table})")], table)

    def test_a_newer_schema_is_refused_with_a_clear_message(self):
        broker = BrokerProcess()
        os.makedirs(broker.state_dir, mode=0o700)
        db = sqlite3.connect(os.path.join(broker.state_dir, "broker.db"))
        db.execute("PRAGMA user_version=99")
        db.close()
        os.chmod(os.path.join(broker.state_dir, "broker.db"), 0o600)
        try:
            broker.start(wait=False)
            self.assertEqual(broker.proc.wait(10), 2)
            self.assertIn("schema version 99, newer than this broker knows", broker.read_log())
        finally:
            broker.cleanup()


if __name__ == "__main__":
    unittest.main()
