"""Wake-ups: a waiting read is answered by the commit that gives it something, whatever the order of one
loop iteration's requests; and an idle session's background waiter (hook.py Wait) wakes it."""
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import BrokerTestCase  # noqa: E402
from ctl import common as ctl_common  # noqa: E402

WAIT = 3          # a missed wake-up shows as an answer this late


def http(method: str, path: str, port: int, token: str, body=None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(payload)}\r\n")
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + payload


def read_answer(sock: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"!"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return json.loads(body)


class SameIterationTest(BrokerTestCase):
    """A waiting read and a send to its peer landing in one loop iteration, in both orders. The broker is
    held with SIGSTOP while both requests are written, so its next select() returns both, in arrival order."""

    def setUp(self):
        tag = f"{time.monotonic_ns()}"
        self.reader = self.broker.join(f"reader-{tag}")
        self.sender = self.broker.join(f"sender-{tag}")
        self.port = self.broker.port
        self.socks = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(2)]
        for sock, peer in zip(self.socks, (self.reader, self.sender)):     # accepted and idle before the pause
            sock.sendall(http("GET", "/peers", self.port, peer.token))
            read_answer(sock)

    def tearDown(self):
        for sock in self.socks:
            sock.close()

    def one_round(self, read_first: bool, text: str) -> float:
        read_sock, send_sock = self.socks
        read = (read_sock, http("GET", f"/inbox?wait={WAIT}", self.port, self.reader.token))
        send = (send_sock, http("POST", "/messages", self.port, self.sender.token,
                                {"to": self.reader.name, "content": text}))
        pid = self.broker.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            for sock, data in (read, send) if read_first else (send, read):
                sock.sendall(data)
            time.sleep(0.02)
        finally:
            os.kill(pid, signal.SIGCONT)
        started = time.monotonic()
        batch = read_answer(read_sock)
        waited = time.monotonic() - started
        self.assertIn("message_id", read_answer(send_sock))
        self.assertEqual([m["content"] for m in batch["messages"]], [text])
        self.reader.ok("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in batch["messages"]]})
        return waited

    def test_read_then_send_in_one_iteration(self):
        for i in range(5):
            self.assertLess(self.one_round(True, f"read first {i}"), 1.0, "the waiting read missed its wake-up")

    def test_send_then_read_in_one_iteration(self):
        for i in range(5):
            self.assertLess(self.one_round(False, f"send first {i}"), 1.0, "the waiting read missed its wake-up")


class ConcurrentWakeTest(BrokerTestCase):
    """Many pairs, each round a waiting read and a send written at nearly the same jittered instant: no read
    is answered later than a generous 200 ms after its message's send was answered."""

    PAIRS, ROUNDS, MARGIN = 12, 8, 0.2

    def test_no_read_waits_past_its_message(self):
        port = self.broker.port
        pairs = [(self.broker.join(f"r{i}"), self.broker.join(f"s{i}")) for i in range(self.PAIRS)]
        barrier = threading.Barrier(2 * self.PAIRS, timeout=30)
        sent_at, read_at, failures = {}, {}, []

        def reader(i, peer):
            client = ctl_common.BrokerClient(port, token=peer.token, timeout=WAIT + 5)
            try:
                for r in range(self.ROUNDS):
                    barrier.wait()
                    time.sleep(random.uniform(0, 0.004))
                    status, batch = client.request("GET", f"/inbox?wait={WAIT}")
                    read_at[i, r] = time.monotonic()
                    if status != 200 or [m["content"] for m in batch["messages"]] != [f"{i}:{r}"]:
                        failures.append((i, r, status, batch))
                        continue
                    client.request("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in batch["messages"]]})
            except Exception as exc:
                failures.append((i, "reader", repr(exc)))
            finally:
                client.close()

        def sender(i, peer, to):
            client = ctl_common.BrokerClient(port, token=peer.token, timeout=10)
            try:
                for r in range(self.ROUNDS):
                    barrier.wait()
                    time.sleep(random.uniform(0, 0.004))
                    status, _ = client.request("POST", "/messages", {"to": to, "content": f"{i}:{r}"})
                    sent_at[i, r] = time.monotonic()
                    if status != 200:
                        failures.append((i, r, "send", status))
            except Exception as exc:
                failures.append((i, "sender", repr(exc)))
            finally:
                client.close()

        threads = [threading.Thread(target=reader, args=(i, r)) for i, (r, _) in enumerate(pairs)]
        threads += [threading.Thread(target=sender, args=(i, s, r.name)) for i, (r, s) in enumerate(pairs)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertFalse(failures, failures[:5])
        late = {key: read_at[key] - sent_at[key] for key in sent_at if read_at[key] - sent_at[key] > self.MARGIN}
        self.assertFalse(late, f"reads answered this long after their message was sent: {late}")
        self.assertLess(time.monotonic() - started, 60)


if __name__ == "__main__":
    unittest.main()
