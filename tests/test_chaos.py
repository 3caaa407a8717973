"""A real team under fire: an architect and three workers (mcp_server.py processes) finish a task graph
while a worker and the broker are killed with SIGKILL and a slow client hangs on to the broker."""
import select
import socket
import threading
import time
import unittest

from helpers import BrokerProcess, McpSession, ctl_common
from test_mcp_server import project_dir


def slow_client(port):
    """A client that sends half a request's head and then says nothing, holding a connection open."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    return sock


def still_waiting(sock) -> bool:
    """The broker has neither answered nor closed this connection."""
    return not select.select([sock], [], [], 0)[0]


def diamond_graph(architect) -> dict:
    """Four stacked diamonds: 13 tasks, each layer waiting on the one before."""
    ids = {"root": architect.ok("create_task", {"title": "root"})["id"]}
    top = ids["root"]
    for layer in range(4):
        left = architect.ok("create_task", {"title": f"L{layer}-left", "depends_on": [top]})["id"]
        right = architect.ok("create_task", {"title": f"L{layer}-right", "depends_on": [top]})["id"]
        top = architect.ok("create_task", {"title": f"L{layer}-join", "depends_on": [left, right]})["id"]
        ids.update({f"L{layer}-left": left, f"L{layer}-right": right, f"L{layer}-join": top})
    return ids


class ChaosTest(unittest.TestCase):
    def test_team_survives_kills_restarts_and_a_slow_client(self):
        # a request may take 60s to arrive whole, so a slow client outlasts each half of the run (the default 10s
        # might cut the second one loose on a busy machine before the team is done)
        broker = BrokerProcess(env={"CTL_RATE_LIMIT": "10000", "CTL_LEASE_SECONDS": "3",
                                    "CTL_REQUEST_TIMEOUT": "60"}).start()
        cwd = project_dir("chaos")
        sessions = []
        slow = slow_again = None
        stop = threading.Event()
        threads = []
        try:
            architect = McpSession(broker, cwd, name="arch")
            sessions.append(architect)
            architect.initialize()
            architect.ok("join", {"role": "architect"})
            diamond_graph(architect)
            workers = {}
            for name in ("w1", "w2", "w3"):
                workers[name] = McpSession(broker, cwd, name=name)
                sessions.append(workers[name])
                workers[name].initialize()
                workers[name].ok("join", {})
            slow = slow_client(broker.port)
            sent = {}                  # message id -> (recipient, content) for every acknowledged send
            completions = []           # (task id, worker, time)
            victim_claim = {}
            lock = threading.Lock()

            victim_has_claimed = threading.Event()

            def work(name, session):
                if name != "w3":
                    victim_has_claimed.wait(20)
                while not stop.is_set():
                    try:
                        claim = session.call("claim_task", {}, timeout=30)
                    except (EOFError, TimeoutError, OSError):
                        return
                    if claim["isError"]:
                        if "no task is ready" in claim["content"][0]["text"] and self._all_done(architect_view):
                            return
                        time.sleep(0.2)
                        continue
                    task = claim["structuredContent"]
                    if name == "w3" and not victim_claim:
                        session.ok("lock_file", {"path": f"t{task['id']}.py"})    # held when it dies
                        victim_claim.update(task)
                        victim_has_claimed.set()
                        stop.wait(60)       # killed here, mid-task
                        return
                    try:
                        session.ok("lock_file", {"path": f"t{task['id']}.py"})
                        time.sleep(0.05)
                        result = session.call("complete_task", {"task_id": task["id"], "summary": f"{name} built {task['title']}"})
                        lost_reply = f"already done by {name}" in result["content"][0]["text"]
                        if not result["isError"] or lost_reply:
                            with lock:
                                completions.append((task["id"], name, time.time()))
                        session.ok("unlock_file", {"path": f"t{task['id']}.py"})
                        for to in ("arch", "w1" if name != "w1" else "w2"):
                            content = f"{name}->{to}: task {task['id']}"
                            reply = session.call("send", {"to": to, "content": content, "category": "status"})
                            if not reply["isError"]:
                                with lock:
                                    sent[reply["structuredContent"]["message_id"]] = (to, content)
                    except (AssertionError, EOFError, TimeoutError, OSError):
                        time.sleep(0.2)

            operator = broker.operator()

            def architect_view():
                return [t for status in ("blocked", "ready", "claimed", "done")
                        for t in operator.ok("GET", f"/tasks?status={status}")["tasks"]]

            threads += [threading.Thread(target=work, args=(n, s), daemon=True) for n, s in workers.items()]
            for thread in threads:
                thread.start()
            deadline = time.time() + 20
            while not victim_claim and time.time() < deadline:
                time.sleep(0.05)
            self.assertTrue(victim_claim, "w3 claimed a task")
            victim_file = f"t{victim_claim['id']}.py"
            self.assertIn({"path": victim_file, "holder": "w3"},
                          [{"path": lk["path"], "holder": lk["holder"]} for lk in operator.ok("GET", "/locks")["locks"]],
                          "w3 holds a lock when it is killed")
            self.assertTrue(still_waiting(slow), "the slow client still hangs on to the first broker")
            workers["w3"].kill9()
            time.sleep(0.5)
            broker.kill9()
            broker.start(wait=False)
            self._wait_for_any_broker(broker)
            slow_again = slow_client(broker.port)      # the first one died with the first broker
            deadline = time.time() + 30
            while time.time() < deadline and any(lk["holder"] == "w3" for lk in operator.ok("GET", "/locks")["locks"]):
                time.sleep(0.2)
            self.assertEqual([lk for lk in operator.ok("GET", "/locks")["locks"] if lk["holder"] == "w3"], [],
                             "the dead worker's lock is freed once its lease expires")
            deadline = time.time() + 90
            while time.time() < deadline and not self._all_done(architect_view):
                time.sleep(0.3)
            stop.set()
            for thread in threads:
                thread.join(30)

            final = {t["id"]: t for t in architect_view()}
            self.assertEqual(len(final), 13)
            self.assertTrue(all(t["status"] == "done" for t in final.values()), final)
            done_ids = [task_id for task_id, _, _ in completions]
            self.assertEqual(sorted(done_ids), sorted(set(done_ids)), "no task completed twice")
            self.assertEqual(set(done_ids), set(final), "every task completed through a tool call")
            for task_id, name, _ in completions:
                self.assertEqual(final[task_id]["done_by"], name)
            self.assertEqual(final[victim_claim["id"]]["status"], "done", "the killed worker's task was redone")
            self.assertIn(final[victim_claim["id"]]["done_by"], ("w1", "w2"), "by a live worker, not the dead one")

            received = {}
            for name, session in (("arch", architect), ("w1", workers["w1"]), ("w2", workers["w2"])):
                for _ in range(50):
                    batch = session.ok("check", {})["messages"]
                    if not batch:
                        break
                    for message in batch:
                        self.assertEqual(message["to"], name, "delivered to the right peer")
                        received[message["id"]] = (name, message["content"])
            self.assertGreaterEqual(len(sent), 20, "the team really talked")
            missing = {mid: sent[mid] for mid in sent if mid not in received}
            self.assertEqual(missing, {}, "every acknowledged message arrived")
            for mid, (to, content) in sent.items():
                self.assertEqual(received[mid], (to, content))

            state = operator.ok("GET", "/state")
            self.assertEqual(state["locks"], [], "every lock was released")
            self.assertTrue(still_waiting(slow_again), "a slow client hung on to the new broker all the while")
            slow_again.sendall(b"Content-Length: 0\r\n\r\n")     # its request, whole at last, is answered
            slow_again.settimeout(10)
            answer = slow_again.recv(65536)
            self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), f"the slow request, tokenless, is refused: {answer!r}")
            broker.stop()
            broker.kill_detached()
            self.assertEqual(broker.integrity(), "ok")
        finally:
            stop.set()
            for sock in (slow, slow_again):
                if sock is not None:
                    sock.close()
            for session in sessions:
                session.dispose()
            for thread in threads:      # a session gone, its worker's next call ends it
                thread.join(10)
            broker.cleanup()

    @staticmethod
    def _all_done(view) -> bool:
        try:
            tasks = view()
        except (AssertionError, ctl_common.BrokerUnavailable):
            return False
        return bool(tasks) and all(t["status"] == "done" for t in tasks)

    @staticmethod
    def _wait_for_any_broker(broker):
        """Our restart and a session's own restart race for the port; either winner is fine."""
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                if broker.request("GET", "/health")[0] == 200:
                    return
            except ctl_common.BrokerUnavailable:
                pass
            time.sleep(0.05)
        raise AssertionError("no broker came back")


if __name__ == "__main__":
    unittest.main()
