"""The broker process: one HTTP event loop on loopback in front of the store (see store.py).

Concurrency design: one thread runs a `selectors` event loop and owns the SQLite connection.
The loop only buffers bytes until a request is complete (the head parsed strictly, bounded in
size and by a deadline), then runs it to completion as one SQLite transaction.
An idle, dripping or stalled client costs a buffer, never the loop's time, so no client can
hold up another; and since one thread owns the state, domain code needs no locks. A waiting
inbox read parks its connection and is answered by the same loop right after the commit that
delivers to it. We chose this over threads feeding a state thread: state has one owner by
construction, and no request pays a hand-off between threads.
"""
import argparse
import contextlib
import errno
import fcntl
import ipaddress
import json
import re
import selectors
import signal
import socket
import sqlite3
import sys
import time
import traceback
import urllib.parse
import os
from http import HTTPStatus
from typing import NamedTuple

from ctl import common, user_command
from ctl.api import Park
from ctl.common import StateError
from ctl.config import IDLE_TIMEOUT, MAX_BODY_BYTES, MAX_HEAD_BYTES, WRITE_TIMEOUT, Settings
from ctl.errors import ApiError
from ctl.frontdoor import Broker, Request, escape_for_log, log




class Connection:
    __slots__ = ("sock", "client", "inbuf", "outbuf", "request_deadline", "idle_deadline", "write_deadline",
                 "park", "close_after", "keep_alive", "scanned", "head", "read_closed", "watched")

    def __init__(self, sock, client: str, now: float):
        self.sock, self.client = sock, client
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.request_deadline = None
        self.idle_deadline = now + IDLE_TIMEOUT
        self.write_deadline = None
        self.park = None
        self.close_after = False
        self.keep_alive = True
        self.scanned = 0            # bytes of inbuf already searched for the end of the head
        self.head = None            # the parsed head (ParsedHead) while its body is still arriving
        self.read_closed = False    # the client shut down its write side: answer what it asked, then close
        self.watched = selectors.EVENT_READ


class IncompleteRequest(Exception):
    pass


HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
SINGLE_HEADERS = {"host", "content-length", "content-type", "authorization", "origin", "transfer-encoding"}
MAX_HEADERS = 100


def parse_header_fields(block: bytes) -> dict:
    """Header fields as {lower-case name: value}, strictly: no folding, no repeats of the ones that matter.

    Written here rather than borrowed from http.client, whose email-based parser cost a sixth of a
    millisecond per request under cProfile (see bench/NOTES.md).
    """
    fields = {}
    lines = block.split(b"\r\n") if block else []
    if len(lines) > MAX_HEADERS:
        raise ApiError(400, "bad_headers", f"more than {MAX_HEADERS} header fields")
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not HEADER_NAME.fullmatch(name):
            raise ApiError(400, "bad_headers", "malformed header field (or a folded line)")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in fields:
            if key in SINGLE_HEADERS:
                raise ApiError(400, "repeated_header", f"the {name.decode('ascii')} header is given more than once")
            text = f"{fields[key]}, {text}"
        fields[key] = text
    return fields


CONTENT_LENGTH = re.compile(r"[0-9]{1,10}")
METHOD = re.compile(r"[A-Z]{1,16}")


class ParsedHead(NamedTuple):
    method: str
    target: str
    version: str
    headers: dict
    size: int                   # bytes of the head, its blank line included
    length: int                 # bytes of the body that follows


def parse_head(head: bytes) -> ParsedHead:
    """The request line and header fields, ending in a blank line, strictly; the body's length from them."""
    if len(head) - 4 > MAX_HEAD_BYTES:
        raise ApiError(431, "head_too_large", f"request head exceeds {MAX_HEAD_BYTES} bytes")
    line_end = head.find(b"\r\n")
    try:
        method, target, version = head[:line_end].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_request_line", "malformed request line")
    if not METHOD.fullmatch(method):
        raise ApiError(400, "bad_method", "the request method must be a few capital letters")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ApiError(505, "http_version", "only HTTP/1.0 and HTTP/1.1 are spoken here")
    if not target.startswith("/"):
        raise ApiError(400, "bad_target", "request target must be a path")
    headers = parse_header_fields(head[line_end + 2:-4])
    if "transfer-encoding" in headers:
        raise ApiError(400, "transfer_encoding", "Transfer-Encoding is not accepted; send Content-Length")
    length = 0
    if "content-length" in headers:
        if not CONTENT_LENGTH.fullmatch(headers["content-length"]):
            raise ApiError(400, "bad_content_length", "Content-Length must be a number")
        length = int(headers["content-length"])
    elif method == "POST":
        raise ApiError(411, "length_required", "POST needs a Content-Length")
    if length > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
    return ParsedHead(method, target, version, headers, len(head), length)


TO_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
SAME_ON_EVERY_ANSWER = ("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
                        "X-Frame-Options: DENY\r\n")
KEEP_ALIVE_HEADERS = SAME_ON_EVERY_ANSWER + "Connection: keep-alive\r\n\r\n"
CLOSING_HEADERS = SAME_ON_EVERY_ANSWER + "Connection: close\r\n\r\n"


class HttpLoop:
    def __init__(self, broker: Broker, host: str, port: int, verbose: bool = False):
        self.broker, self.verbose = broker, verbose
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.connections = set()
        self.ready = {}             # connections with buffered bytes to parse in this iteration, in arrival order
        self.parked = {}            # peer id -> its connections waiting for mail, so a wake-up scans no others
        self.broad = set()          # waiting reads that also watch the room: retried after any change
        self.seen_version = broker.store.version
        self.request_timeout = broker.settings.request_timeout
        self.running = True

    def serve_forever(self) -> None:
        next_tick = next_expiry = 0.0
        while self.running:
            for key, mask in self.selector.select(0 if self.ready else 0.05):
                conn = key.data
                try:
                    if conn is None:
                        self._accept()
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and conn in self.connections:
                        self._read(conn)
                except Exception:
                    self._fail(conn)
            try:
                self._run_batch()
                now = time.monotonic()
                if now >= next_expiry:          # deadlines are coarse: no need to scan every socket per request
                    next_expiry = now + 0.05
                    self._expire(now)
                if now >= next_tick:
                    next_tick = now + 1.0
                    self.broker.tick(idle=not any(c.inbuf or c.outbuf for c in self.connections))
                self._wake_parked()
            except Exception:
                self._fail(None)
        for conn in list(self.connections):
            self._close(conn)
        self.selector.close()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log("out of file descriptors; refusing connections for now")
                return
            if len(self.connections) >= self.broker.settings.max_connections and not self._shed_idle():
                with contextlib.suppress(OSError):
                    sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
                                 b"Connection: close\r\n\r\n")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, f"{address[0]}:{address[1]}", time.monotonic())
            conn.request_deadline = conn.idle_deadline = time.monotonic() + self.request_timeout
            self.connections.add(conn)
            self.broker.connections = len(self.connections)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _shed_idle(self) -> bool:
        """At the cap, make room by closing the connection idle the longest (nothing buffered, no waiting
        read): a crowd of silent sockets cannot lock agents and the dashboard out."""
        idle = [c for c in self.connections if c.park is None and not c.inbuf and not c.outbuf]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.idle_deadline))
        return True

    def _close(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.broker.connections = len(self.connections)
        if conn.park is not None:
            self._unpark(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._end_of_input(conn)
            return
        conn.inbuf += data
        if len(conn.inbuf) > MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096 and (conn.park or conn.outbuf):
            self._close(conn)
            return
        if conn.request_deadline is None:
            conn.request_deadline = time.monotonic() + self.request_timeout
        self._advance(conn)

    def _end_of_input(self, conn: Connection) -> None:
        """The client shut down its write side (a half-close). What it already sent is still answered, a waiting
        read included; the connection closes once nothing is left to answer."""
        conn.read_closed = True
        if conn.park is None and not conn.outbuf and not conn.inbuf:
            self._close(conn)
            return
        self._watch(conn, write=bool(conn.outbuf))
        self._advance(conn)

    def _watch(self, conn: Connection, write: bool) -> None:
        """Select the connection for reading (until its input ended) and, while an answer is pending, writing."""
        events = (0 if conn.read_closed else selectors.EVENT_READ) | (selectors.EVENT_WRITE if write else 0)
        if events == conn.watched:
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif not conn.watched:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.watched = events

    def _fail(self, conn) -> None:
        """The last line of defence: whatever went wrong is logged, that connection closed, the loop goes on."""
        log(f"internal error in the loop:\n{traceback.format_exc()}")
        if conn is not None:
            self._close(conn)

    def _advance(self, conn: Connection) -> None:
        """Mark the connection as having bytes to look at in this iteration's batch."""
        if conn in self.connections and not conn.park and not conn.outbuf and not conn.close_after and conn.inbuf:
            self.ready[conn] = None

    def _run_batch(self) -> None:
        """Group commit: every complete request of this iteration runs in one transaction (each in its own
        savepoint, so a failure rolls back only itself), one commit makes them durable together, and only
        then are the answers written and the waiting reads woken. No answer ever precedes its commit."""
        ready, self.ready = self.ready, {}
        batch = []
        for conn in ready:
            if conn not in self.connections or conn.park or conn.outbuf or conn.close_after:
                continue
            try:
                req = self._parse(conn)
            except IncompleteRequest:
                if conn.read_closed:        # the rest of this request can never arrive
                    self._close(conn)
                continue
            except ApiError as err:
                conn.keep_alive = False
                self._respond(conn, err.status, err.body())
                continue
            conn.request_deadline = time.monotonic() + self.request_timeout if conn.inbuf else None
            batch.append((conn, req))
        if not batch:
            return
        store = self.broker.store
        grouped = len(batch) > 1 and store.begin_batch(any(self.broker.promises(req) for _, req in batch))
        started = time.perf_counter()
        outcomes = [self.broker.handle(req) for _, req in batch]
        if grouped and not store.commit_batch():
            outcomes = [(503, {"error": {"code": "storage_busy", "message": "storage failed to commit; retry"}},
                         {"Retry-After": "1"})] * len(batch)
        for (conn, _), outcome in zip(batch, outcomes):
            if isinstance(outcome, Park):   # parked before the wake-up: a send later in this batch finds them
                conn.park = outcome
                self.parked.setdefault(outcome.peer_id, set()).add(conn)
                if outcome.broad:
                    self.broad.add(conn)
        self._wake_parked()                 # the recipients hear first; the senders' answers follow
        elapsed = (time.perf_counter() - started) * 1000
        for (conn, req), outcome in zip(batch, outcomes):
            if isinstance(outcome, Park):
                continue
            self._respond(conn, *outcome)
            if self.verbose or outcome[0] >= 400:
                log(f"{req.client} {escape_for_log(req.method)} {escape_for_log(req.path)} -> {outcome[0]} "
                    f"({elapsed:.1f} ms for a batch of {len(batch)})")

    def _parse(self, conn: Connection) -> Request:
        """However a request dribbles in, each byte is looked at a bounded number of times: the search for the
        head's end resumes where the last one stopped, and a parsed head is kept while its body arrives."""
        buf = conn.inbuf
        if conn.head is None:
            end = buf.find(b"\r\n\r\n", max(0, conn.scanned - 3))
            if end < 0:
                conn.scanned = len(buf)
                if len(buf) > MAX_HEAD_BYTES:
                    raise ApiError(431, "head_too_large", f"request head exceeds {MAX_HEAD_BYTES} bytes")
                raise IncompleteRequest()
            conn.scanned = 0
            conn.head = parse_head(bytes(buf[:end + 4]))
        head = conn.head
        total = head.size + head.length
        if len(buf) < total:
            raise IncompleteRequest()
        conn.head = None
        body = bytes(buf[head.size:total])
        del buf[:total]
        connection = head.headers.get("connection", "").lower()
        conn.keep_alive = "close" not in connection and (head.version == "HTTP/1.1" or "keep-alive" in connection)
        path, _, query = head.target.partition("?")
        return Request(head.method, urllib.parse.unquote(path), query, head.headers, body, conn.client)

    def _respond(self, conn: Connection, status: int, body, extra_headers=None) -> None:
        if isinstance(body, dict):
            try:
                payload = TO_JSON(body).encode()
            except UnicodeEncodeError:      # a lone surrogate somewhere: \u-escapes are still valid JSON
                payload = json.dumps(body, separators=(",", ":")).encode()
            content_type = "application/json"
        else:
            payload, content_type = body, None
        headers = {"Content-Type": content_type, **(extra_headers or {})}
        if status == 429:
            headers["Retry-After"] = str(body["error"].get("retry_after", 60))
        if status == 405:
            headers["Allow"] = "GET, POST"
        close = not conn.keep_alive or status in (400, 408, 411, 413, 431, 505)
        head = [STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status\r\n", f"Content-Length: {len(payload)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items() if v is not None]
        head.append(CLOSING_HEADERS if close else KEEP_ALIVE_HEADERS)
        conn.outbuf += "".join(head).encode("latin-1") + payload
        conn.close_after = close
        conn.idle_deadline = time.monotonic() + IDLE_TIMEOUT
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        try:
            sent = conn.sock.send(conn.outbuf) if conn.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if conn.outbuf:
            if conn.write_deadline is None:
                conn.write_deadline = time.monotonic() + WRITE_TIMEOUT
                self._watch(conn, write=True)
            return
        if conn.write_deadline is not None:
            conn.write_deadline = None
            self._watch(conn, write=False)
        if conn.close_after or (conn.read_closed and not conn.inbuf and conn.park is None):
            self._close(conn)
        elif conn.inbuf:
            self._advance(conn)

    def _expire(self, now: float) -> None:
        for conn in list(self.connections):
            if conn.park is not None:
                if now >= conn.park.deadline:
                    self._finish_park(conn, final=True)
            elif conn.write_deadline is not None and now >= conn.write_deadline:
                self._close(conn)
            elif conn.request_deadline is not None and now >= conn.request_deadline:
                conn.keep_alive = False
                self._respond(conn, 408, {"error": {"code": "request_timeout",
                                                    "message": f"request not received within {self.request_timeout:.0f}s"}})
            elif conn.request_deadline is None and not conn.outbuf and now >= conn.idle_deadline:
                self._close(conn)

    def _wake_parked(self) -> None:
        store = self.broker.store
        changed, self.seen_version = store.version != self.seen_version, store.version
        if not store.woken and not store.wake_everyone and not (changed and self.broad):
            return
        woken, everyone = store.woken, store.wake_everyone
        store.woken, store.wake_everyone = set(), False
        waiting = {conn for peer_id in (list(self.parked) if everyone else woken) for conn in self.parked.get(peer_id, ())}
        if changed:
            waiting |= self.broad
        for conn in waiting:
            if conn.park is not None:
                self._finish_park(conn, final=False)

    def _unpark(self, conn: Connection) -> None:
        self.broad.discard(conn)
        waiting = self.parked.get(conn.park.peer_id, set())
        waiting.discard(conn)
        if not waiting:
            self.parked.pop(conn.park.peer_id, None)
        conn.park = None

    def _finish_park(self, conn: Connection, final: bool) -> None:
        try:
            result = conn.park.attempt(final)
        except ApiError as err:
            self._unpark(conn)
            self._respond(conn, err.status, err.body())
            return
        except Exception:
            log(f"waiting read failed:\n{traceback.format_exc()}")
            result = {"error": {"code": "internal", "message": "internal error; see the broker log"}}
            self._unpark(conn)
            self._respond(conn, 500, result)
            return
        if result is None:
            return
        self._unpark(conn)
        self._respond(conn, 200, result)
        self._advance(conn)


# ---------------------------------------------------------------- running it


def require_loopback(host: str) -> str:
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise StateError(f"cannot resolve host {host!r}")
    if not address.is_loopback or address.version != 4:
        raise StateError(f"refusing to bind {host}: the broker only listens on an IPv4 loopback address")
    return str(address)


def hold_state_lock(state_dir: str):
    """One broker per state directory: a second one would fight the first over the same database."""
    path = os.path.join(state_dir, "broker.pid")
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        other = handle.read().strip() or "unknown"
        raise StateError(f"another broker ({other}) already uses {state_dir}; stop it or use another --state-dir")
    return handle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Control Tower Lite broker (localhost only)")
    common.add_location_args(parser)
    parser.add_argument("--host", default=common.HOST, help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true", help="log every request, not only refusals")
    args = parser.parse_args(argv)
    os.umask(0o077)
    try:
        settings = Settings.from_env()
        port = common.resolve_port(args.port)
        host = require_loopback(args.host)
        state_dir = common.ensure_state_dir(common.resolve_state_dir(args.state_dir))
        lock = hold_state_lock(state_dir)
        broker = Broker(state_dir, port, host, settings)
        try:
            loop = HttpLoop(broker, host, port, verbose=args.verbose)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StateError(f"port {port} is in use: is a broker already running ({user_command('launch')} --status)? "
                                 "or choose another with --port / CTL_PORT")
            raise
    except (StateError, sqlite3.Error, OSError) as exc:
        sys.stderr.write(f"broker: {exc}\n")
        return 2
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} port {port}")
    lock.flush()

    def stop(signum, frame):
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on http://{host}:{port}/ (state {state_dir}, pid {os.getpid()})")
    try:
        loop.serve_forever()
    finally:
        broker.store.close()
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
