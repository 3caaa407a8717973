#!/usr/bin/env python3
"""Two reference servers that bound what one pair of the round-trip loop can reach on this machine, run by
bench/run.py beside the real systems with the same client:

    python3 bench/reference.py answer PORT       answers at once and stores nothing: the client's own ceiling
    python3 bench/reference.py durable PORT DIR  the least a durable broker must do: a send is one SQLite
                                                 commit with its fsync (WAL, synchronous=FULL) before its
                                                 answer; a read that acknowledges is one commit without

They speak only the two calls the loop makes (POST /messages, GET /inbox?ack=), with the bearer token as
the peer's name: no auth, no rules, no filter, no rooms. Not a product; a measuring stick.
"""
import json
import os
import selectors
import socket
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, sender TEXT, content TEXT, sent_at REAL);
CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, message INTEGER, peer TEXT, acked INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS unread ON deliveries (peer, acked, id);
"""


class Answering:
    def send(self, peer: str, body: dict) -> dict:
        return {"id": 1}

    def inbox(self, peer: str, ack) -> dict:
        return {"messages": [{"delivery_id": 1, "content": "rt"}]}


class Durable:
    def __init__(self, folder: str):
        self.db = sqlite3.connect(os.path.join(folder, "reference.db"), isolation_level=None)
        self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.synchronous = None

    def _commit_with(self, synchronous: str, work):
        if synchronous != self.synchronous:
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            self.synchronous = synchronous
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def send(self, peer: str, body: dict) -> dict:
        def work():
            message = self.db.execute("INSERT INTO messages (sender, content, sent_at) VALUES (?, ?, ?)",
                                      (peer, body["content"], time.time())).lastrowid
            self.db.execute("INSERT INTO deliveries (message, peer) VALUES (?, ?)", (message, body["to"]))
            return {"id": message}
        return self._commit_with("FULL", work)

    def inbox(self, peer: str, ack) -> dict:
        def work():
            if ack is not None:
                self.db.execute("UPDATE deliveries SET acked = 1 WHERE peer = ? AND acked = 0 AND id <= ?", (peer, ack))
            rows = self.db.execute("SELECT d.id, m.content FROM deliveries d JOIN messages m ON m.id = d.message "
                                   "WHERE d.peer = ? AND d.acked = 0 ORDER BY d.id LIMIT 100", (peer,)).fetchall()
            return {"messages": [{"delivery_id": i, "content": c} for i, c in rows]}
        return self._commit_with("NORMAL", work)


def answer(app, head: bytes, body: bytes) -> bytes:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    peer = next((line.split(" ", 2)[2] for line in lines[1:] if line.lower().startswith("authorization:")), "")
    if method == "POST":
        result = app.send(peer, json.loads(body))
    else:
        query = dict(part.split("=", 1) for part in target.partition("?")[2].split("&") if "=" in part)
        result = app.inbox(peer, int(query["ack"]) if "ack" in query else None)
    payload = json.dumps(result).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)


def serve(app, port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock is listener:
                client, _ = listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(client, selectors.EVENT_READ)
                buffers[client] = b""
                continue
            data = sock.recv(65536)
            if not data:
                selector.unregister(sock)
                sock.close()
                del buffers[sock]
                continue
            buffers[sock] += data
            while b"\r\n\r\n" in buffers[sock]:
                head, rest = buffers[sock].split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(rest) < length:
                    break
                buffers[sock] = rest[length:]
                sock.sendall(answer(app, head, rest[:length]))


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    serve(Durable(sys.argv[3]) if mode == "durable" else Answering(), port)


if __name__ == "__main__":
    main()
