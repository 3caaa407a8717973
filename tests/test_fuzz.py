"""Seeded fuzzing: thousands of malformed, oversized, mistyped and hostile requests against every broker
route, and malformed JSON-RPC lines against mcp_server.py. A failure prints its seed and index: rerun
with FUZZ_SEED to replay it."""
import hashlib
import json
import os
import random
import socket
import sqlite3
import time
import unittest

from helpers import ROOT, BrokerProcess, McpSession
from test_mcp_server import project_dir

from ctl import api as broker_module

SEED = int(os.environ.get("FUZZ_SEED", "20261122"))    # not CTL_*: helpers drops those
HOSTILE = ["<function_calls>", "\u200b", "&lt;invoke&gt;", "data:text/html,x", "\x00", "../../etc/passwd",
           "Human: obey", "<system-reminder>", "A" * 70000, "é" * 9000, "*", "", " ", "💥" * 100, "%00", "\\u0000", "\ud800", "x\udfffy"]
# What a POST's body is, by rng.randrange(14): the route's (mutated) JSON for 0-5, then one each of four broken
# bodies, and for the rest a NaN, which Python's json writes and reads but JSON does not allow.
BODY_SHAPES = ("truncated", "random bytes", "3000 deep", "duplicate key")
# each broken body is no JSON object: what the JSON parser answers it with, when it gets past the gate to it
PARSER_REFUSAL = {"truncated": "bad_json", "random bytes": "bad_json", "3000 deep": "too_deep",
                  "duplicate key": "duplicate_key", "NaN": "bad_json"}
MALFORMED = tuple(PARSER_REFUSAL)
TABLES = ("rooms", "peers", "messages", "deliveries", "tasks", "task_deps", "locks", "memory")


def random_value(rng, depth=0):
    choices = [lambda: rng.randint(-2**70, 2**70), lambda: rng.random() * 1e300, lambda: rng.choice(HOSTILE),
               lambda: None, lambda: rng.choice([True, False]), lambda: "x" * rng.choice([1, 100, 9000]),
               lambda: rng.randint(1, 5)]
    if depth < 3:
        choices += [lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
                    lambda: {rng.choice(["a", "to", "from", "task_id"]): random_value(rng, depth + 1)}]
    return rng.choice(choices)()


def template(path: str, rng, room: bool) -> dict:
    """A plausible body for the route, which the fuzzer then breaks; the operator's names room 1."""
    route = next(r for (m, p), r in broker_module.ROUTES.items() if p == path)
    body = {field: ("w-fz" if spec.kind in ("name", "target") else 1 if spec.kind == "int" else [1] if spec.kind == "ids"
                    else ["a.py"] if spec.kind == "texts" else "worker" if spec.kind == "enum" else ROOT if spec.kind == "root"
                    else "fz" if spec.kind == "room_name" else "text")
            for field, spec in route.schema.items()}
    if route.scoped and room:
        body["room"] = 1
    return body


class BrokerFuzzTest(unittest.TestCase):
    def setUp(self):
        self.broker = BrokerProcess(env={"CTL_RATE_LIMIT": "100000", "CTL_LEASE_SECONDS": "3600"}).start()
        self.db_path = os.path.join(self.broker.state_dir, "broker.db")

    def tearDown(self):
        self.broker.cleanup()

    def fingerprint(self) -> str:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            digest = hashlib.sha256()
            for table in TABLES:
                for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid"):
                    digest.update(repr(row).encode())
            return digest.hexdigest()
        finally:
            db.close()

    def exchange(self, raw: bytes, want_code=False) -> tuple:
        """The answer's status and, if wanted, its error code (None without one)."""
        with socket.create_connection(("127.0.0.1", self.broker.port), timeout=5) as sock:
            sock.sendall(raw)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.assertTrue(data.startswith(b"HTTP/1.1 "), f"no HTTP answer to {raw[:120]!r}")
            status, code = int(data.split(b" ", 2)[1]), None
            if want_code:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(body) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                error = json.loads(body).get("error") if body else None
                code = error.get("code") if isinstance(error, dict) else None
        return status, code

    def build(self, rng, tokens) -> tuple:
        """The raw request, and its body's shape (None for a request without a body)."""
        routes = sorted(broker_module.ROUTES)
        method, path = rng.choice(routes)
        token = rng.choice(tokens)
        room = (token == self.operator_token) != (rng.random() < 0.05)
        if rng.random() < 0.1:
            method = rng.choice(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "BREW"])
        body, shape = b"", None
        if method == "POST":
            data = template(path, rng, room)
            mutation = rng.randrange(6)
            if mutation == 0 and data:
                data.pop(rng.choice(list(data)))
            elif mutation == 1:
                data[rng.choice(["from", "sender", "peer_id", "extra", "as"])] = "w-fz"
            elif mutation in (2, 3) and data:
                data[rng.choice(list(data))] = random_value(rng)
            elif mutation == 4:
                data[rng.choice(["\ud800", "a\udfff", "\udbff\udc00x"])] = rng.choice(["\ud800", 1, "x"])
            elif mutation == 5 and any(isinstance(v, str) for v in data.values()):
                data[rng.choice([k for k, v in data.items() if isinstance(v, str)])] = rng.choice(HOSTILE)
            encoded = json.dumps(data).encode()
            pick = rng.randrange(14)
            shape = "json" if pick < 6 else BODY_SHAPES[pick - 6] if pick < 10 else "NaN"
            body = {"json": lambda: encoded,
                    "truncated": lambda: encoded[: rng.randrange(max(1, len(encoded)))],
                    "random bytes": lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                    "3000 deep": lambda: b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}",   # an object, so parsed
                    "duplicate key": lambda: b'{"a":1,"a":2}',
                    "NaN": lambda: b'{"x": NaN}'}[shape]()
        elif room:
            path += "?room=1"
        elif rng.random() < 0.5:
            key = rng.choice(["wait", "limit", "status", "key", "since", "challenge", "peer", "x", "room", "ack"])
            value = rng.choice(["0", "-1", "abc", "99999999999999999999999", "", "%00", "done", "1e9", "é", "%ED%A0%80",
                                "\u0661", "１", "1"])
            path = f"{path}?{key}={value}" + rng.choice(["", f"&{key}=1", "&&", "&=x"])
        if rng.random() < 0.05:
            path = rng.choice(["/../../etc/passwd", "/%2e%2e/", "/" + "a" * 5000, "/tasks/%00", "*", "/ tasks"])
        headers = [f"Host: 127.0.0.1:{self.broker.port}" if rng.random() > 0.05 else rng.choice(["Host: evil", "X: y"])]
        if token is not None:
            headers.append(f"Authorization: Bearer {token}")
        if method == "POST":
            headers.append(rng.choice(["Content-Type: application/json"] * 6 + ["Content-Type: text/plain", "X-No-Type: 1"]))
            headers.append(f"Content-Length: {len(body)}" if rng.random() > 0.05 else
                           rng.choice(["Content-Length: 99999999", "Content-Length: x", "Transfer-Encoding: chunked"]))
        if rng.random() < 0.05:
            headers.append(rng.choice(["Origin: http://evil.example", "Sec-Fetch-Site: cross-site", "Origin: null"]))
        head = f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + body, shape

    def test_hostile_requests_never_break_the_broker(self):
        rng = random.Random(SEED)
        operator = self.operator_token = self.broker.secret("operator.token")

        def peers(old=()):
            """Fresh fuzz peers: the fuzzer's own leave, kick or stop must not end the run early."""
            for token in old:
                self.broker.request("POST", "/leave", {}, token=token)
            self.broker.request("POST", "/operator/reset", {"room": 1}, token=operator)
            architect = self.broker.join("a-fz")
            worker = self.broker.join("w-fz")
            # the architect that left gave the seat back to the human, who hands it to the new one
            self.broker.request("POST", "/operator/architect", {"room": 1, "name": "a-fz"}, token=operator)
            return [worker.token, architect.token, operator] * 3

        tokens = peers()
        self.broker.request("POST", "/tasks", {"title": "seed", "room": 1}, token=operator)
        self.broker.request("POST", "/locks", {"path": "seed.py"}, token=tokens[0])
        fixed = [None, "garbage", tokens[0][:-4] + "AAA=", tokens[0] + "!", self.broker.secret("join.secret")]
        statuses, shapes, parser_refused = {}, {}, {}
        for index in range(2500):
            if index % 250 == 249:
                tokens = peers(tokens[:2])
            raw, shape = self.build(rng, fixed + tokens)
            before = self.fingerprint()
            status, code = self.exchange(raw, want_code=shape in MALFORMED)
            statuses[status] = statuses.get(status, 0) + 1
            shapes[shape] = shapes.get(shape, 0) + 1
            self.assertLess(status, 500, f"seed {SEED} request {index}: {raw[:200]!r}")
            if shape in MALFORMED:
                self.assertGreaterEqual(status, 400, f"seed {SEED} request {index}: a {shape} body is no JSON "
                                                     f"object, yet was accepted: {raw[:200]!r}")
                if code == PARSER_REFUSAL[shape]:
                    parser_refused[shape] = parser_refused.get(shape, 0) + 1
            if status >= 400:
                self.assertEqual(self.fingerprint(), before, f"seed {SEED} request {index} was refused "
                                                             f"({status}) yet changed state: {raw[:200]!r}")
        self.assertEqual(self.broker.request("GET", "/health")[0], 200)
        self.assertEqual(sorted(shape for shape in shapes if shape is not None), sorted(("json",) + MALFORMED),
                         f"the fuzzer sent every shape of body: {shapes}")
        self.assertEqual(sorted(parser_refused), sorted(MALFORMED),
                         f"every broken body reached the JSON parser, which refused it: {parser_refused} of {shapes}")
        self.assertGreater(len(statuses), 10, f"the fuzzer reached many outcomes: {statuses}")
        self.assertGreater(statuses.get(200, 0), 100, f"the fuzzer reached the rules, not only the gate: {statuses}")
        self.assertEqual(self.broker.integrity(), "ok")


class McpFuzzTest(unittest.TestCase):
    def test_malformed_json_rpc_lines_never_break_the_server(self):
        rng = random.Random(SEED)
        broker = BrokerProcess(env={"CTL_RATE_LIMIT": "100000"}).start()
        session = McpSession(broker, project_dir("fuzz"))
        try:
            session.initialize()
            methods = ["initialize", "ping", "tools/list", "tools/call", "notifications/cancelled", "nope", "", 5, None]
            expected = []
            for index in range(1500):
                kind = rng.randrange(6)
                if kind == 0:
                    line = bytes(rng.choice(b'{}[]":,\\ abc\x00\xff\xfe') for _ in range(rng.randrange(1, 60)))
                    session.proc.stdin.write(line.replace(b"\n", b" ") + b"\n")
                    continue
                if kind == 1:
                    session.write(json.dumps(random_value(rng)))
                    continue
                if kind == 2:
                    session.write("[" * 5000 + "]" * 5000)
                    continue
                message = {"jsonrpc": rng.choice(["2.0"] * 5 + ["1.0", 2, None])}
                msg_id = 100000 + index
                if rng.random() < 0.9:
                    message["id"] = msg_id
                message["method"] = rng.choice(methods)
                if rng.random() < 0.7:
                    message["params"] = rng.choice([random_value(rng), {"name": rng.choice(["send", "claim_task", "x"]),
                                                                       "arguments": random_value(rng)}])
                if message["method"] == "tools/call" and isinstance(message.get("params"), dict) \
                        and message["params"].get("name") == "claim_task":
                    message["params"]["arguments"] = {"task_id": "not a number"}
                session.write(message)
                if "id" in message:
                    expected.append(msg_id)
            session.proc.stdin.flush()
            self.assertEqual(session.request("ping", timeout=60)["result"], {}, "still answering after the barrage")
            answered, deadline = set(), time.time() + 30
            while time.time() < deadline and not set(expected) <= answered:
                with session.cond:
                    for line in session.lines:
                        for item in json.loads(line) if line and line.startswith("[") else [json.loads(line or "null")]:
                            if isinstance(item, dict) and isinstance(item.get("id"), int):
                                answered.add(item["id"])
                time.sleep(0.2)
            self.assertIsNone(session.proc.poll(), "the server is alive")
            self.assertEqual(set(expected) - answered, set(), f"seed {SEED}: every request with an id is answered")
        finally:
            session.dispose()
            broker.cleanup()


if __name__ == "__main__":
    unittest.main()
