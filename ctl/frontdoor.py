"""The front door: checks every request passes before routing (Host, Origin, media type, JSON),
authentication by token, and the JSON error envelope. No exception leaves `Broker.handle`."""
import hashlib
import hmac
import json
import os
import re
import sqlite3
import sys
import time
import traceback
from urllib.parse import unquote_plus
from base64 import b64encode
from dataclasses import dataclass

from ctl import common, dashboard
from ctl.api import JOINING, PUBLIC, ROUTE_METHODS, ROUTES, Park, Route, room_id_from, safe_name, screen_fields, validate
from ctl.config import MAX_JSON_DEPTH, PRUNE_EVERY, Settings
from ctl.errors import ApiError
from ctl.store import Actor, JoinCaller, StorageBusy, Store
from ctl.tokens import TokenSigner


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} broker: {message}\n")
    sys.stderr.flush()


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict             # lower-case field name -> value
    body: bytes
    client: str


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = dict(pairs)
    if len(seen) != len(pairs):
        keys = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in keys or keys.add(key)))
    return seen


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(digits: str) -> int:
    """Python 3.10 turns digits into an int in quadratic time: no field here needs more than 19 of them."""
    if len(digits) > 20:
        raise ValueError("a number has more than 20 digits")
    return int(digits)


# The depth scan, every step a linear pass in C: escapes out first (so a string is quote to quote and an
# unclosed one is scanned once, not once per quote it holds), then strings, then all but brackets, all of
# one kind; each replace then peels one level, so what is left after MAX_JSON_DEPTH of them nests too deep.
_ESCAPES = re.compile(r"\\.", re.S)
_STRINGS = re.compile(r'"[^"]*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("{}", "[]")


def _nests_too_deep(text: str) -> bool:
    """For text already parsed as JSON, so its brackets pair up."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", _ESCAPES.sub("", text))).translate(_ONE_KIND)
    for _ in range(MAX_JSON_DEPTH):
        brackets = brackets.replace("[]", "")
    return bool(brackets)


def parse_json_object(raw: bytes) -> dict:
    """A JSON object, in time linear in the body's size, whatever the body holds (see tests/test_security.py)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_json", "body must be UTF-8 JSON")
    if not text.lstrip(" \t\r\n").startswith("{"):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                          parse_int=_bounded_int)
    except _DuplicateKey as exc:
        raise ApiError(400, "duplicate_key", f"JSON object repeats the key {safe_name(str(exc))!r}")
    except RecursionError:
        raise ApiError(400, "too_deep", f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {str(exc)[:120]}")
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nests_too_deep(text):
        raise ApiError(400, "too_deep", f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_query(query: str) -> dict:
    """`a=1&b=x`, strictly: every field has an `=`, no name twice, at most 16 fields, valid UTF-8."""
    if not query:
        return {}
    fields = query.split("&")
    if len(fields) > 16:
        raise ApiError(400, "bad_query", "query string has more than 16 fields")
    data = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or not key:
            raise ApiError(400, "bad_query", "query string is malformed: each field is name=value")
        try:
            key, value = unquote_plus(key, errors="strict"), unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_query", "query string is not valid UTF-8")
        if key in data:
            raise ApiError(400, "bad_query", f"query parameter '{safe_name(key)}' is repeated")
        data[key] = value
    return data


def escape_for_log(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


class Broker:
    """HTTP semantics around the store: the gate, authentication, validation, routing, JSON errors."""

    def __init__(self, state_dir: str, port: int, host: str, settings: Settings):
        self.state_dir, self.port, self.settings = state_dir, port, settings
        self.hmac_key = common.read_secret(state_dir, common.HMAC_KEY_FILE, create=True)
        self.join_secret = common.read_secret(state_dir, common.JOIN_SECRET_FILE, create=True).encode()
        self.operator_token = common.read_secret(state_dir, common.OPERATOR_TOKEN_FILE, create=True).encode()
        self.observer_token = common.read_secret(state_dir, common.OBSERVER_TOKEN_FILE, create=True).encode()
        self.own_secrets = tuple(t.decode() for t in (self.join_secret, self.operator_token, self.observer_token)) \
            + (self.hmac_key,)
        self.signer = TokenSigner(self.hmac_key)
        self.db_path = db_path = os.path.join(state_dir, "broker.db")
        for suffix in ("", "-wal", "-shm"):
            common.check_private_file(db_path + suffix)
        self.store = Store(db_path, settings)
        self.allowed_hosts = {f"{host}:{port}", f"localhost:{port}"}
        self.allowed_origins = {f"http://{h}" for h in self.allowed_hosts}
        self.started = time.time()
        self.next_prune = self.started + PRUNE_EVERY
        self.connections = 0
        self.static_pages = self._static_pages()
        self.handoffs = dashboard.Handoffs(state_dir, port)

    def _static_pages(self) -> dict:
        """GET responses that carry no data, so they need no token: path -> (status, body, headers)."""
        loaded = self._load_dashboard()
        if loaded is None:
            page = (404, {"error": {"code": "no_dashboard", "message": "dashboard.html is missing: it belongs at the "
                                    "top of the checkout, or among an install's data files"}}, {})
        else:
            page = (200, loaded[0], {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": loaded[1]})
        return {"/": page, "/dashboard.html": page, "/favicon.ico": (204, b"", {})}

    def _load_dashboard(self):
        try:
            with open(dashboard.page_path() or "", "rb") as handle:
                page = handle.read()
        except OSError:
            return None
        text = page.decode("utf-8")

        def allowed(tag: str) -> str:
            """The page's own inline blocks, by hash: nothing else may run or style it."""
            digests = [b64encode(hashlib.sha256(body.encode()).digest()).decode()
                       for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)]
            return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

        csp = (f"default-src 'none'; script-src {allowed('script')}; style-src {allowed('style')}; "
               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return page, csp

    def refreshed_token(self, actor: Actor):
        """A fresh session token once half the old one's life is gone, so a long session never expires."""
        if actor.kind != "peer" or actor.token_expires - time.time() > self.settings.token_ttl / 2:
            return None
        return self.mint(actor.peer, "session")

    def mint(self, peer, scope: str) -> str:
        return self.signer.mint(peer["id"], peer["generation"], peer["role"], scope,
                                int(time.time()) + self.settings.token_ttl)

    def health(self) -> dict:
        size = sum(os.path.getsize(self.db_path + s) for s in ("", "-wal") if os.path.exists(self.db_path + s))
        return {"uptime": round(time.time() - self.started, 1), "connections": self.connections,
                "db_bytes": size, "port": self.port}

    def gate(self, req: Request) -> None:
        """Checks that come before routing, on every request, whoever asks."""
        host = req.headers.get("host")
        if host is None:
            raise ApiError(400, "missing_host", "a Host header is required")
        if host.lower() not in self.allowed_hosts:
            raise ApiError(421, "wrong_host", f"Host must be one of {sorted(self.allowed_hosts)}")
        origin = req.headers.get("origin")
        if origin is not None and origin.lower() not in self.allowed_origins:
            raise ApiError(403, "foreign_origin", "requests from other origins are refused")
        fetch_site = req.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none") and not self._page_visit(req):
            raise ApiError(403, "cross_site", "cross-site requests are refused")

    def _page_visit(self, req: Request) -> bool:
        """A top-level visit to the static page, from a link or launch's handoff file: it carries no token,
        reads no data and changes nothing, so it may come from another site. API calls stay same-origin."""
        return (req.method == "GET" and req.path in self.static_pages
                and req.headers.get("sec-fetch-mode", "").lower() == "navigate"
                and req.headers.get("sec-fetch-dest", "").lower() == "document")

    def authenticate(self, req: Request, route: Route) -> Actor:
        """Who is asking, from the token alone. `authorize` then decides whether they may."""
        if route.who == PUBLIC:
            return Actor("public")
        scheme, _, presented = req.headers.get("authorization", "").partition(" ")
        presented = presented.lstrip(" ")       # the spaces after the scheme are HTTP's; the token is exact
        if scheme.lower() != "bearer" or not presented or len(presented) > 600:
            raise ApiError(401, "missing_token", "send 'Authorization: Bearer <token>'; join first to get one")
        presented = presented.encode("utf-8", "replace")
        if route.who == JOINING:
            if not hmac.compare_digest(presented, self.join_secret):
                raise ApiError(401, "bad_join_secret", "join needs the join secret from the state directory")
            return Actor("join")
        if hmac.compare_digest(presented, self.operator_token):
            return Actor("operator")
        if hmac.compare_digest(presented, self.observer_token):
            return Actor("observer")
        return self._token_actor(presented.decode("utf-8", "replace"))

    def authorize(self, req: Request, route: Route, actor: Actor, data: dict) -> None:
        """The kind of token, the architect seat, the room the call acts on, and the room's stop."""
        if actor.kind not in route.who:
            raise ApiError(403, "forbidden", f"{actor.kind} tokens may not call {req.method} {req.path}")
        if route.architect and actor.kind == "peer" and actor.role != "architect":
            room = self.store.room(actor.room_id)
            raise ApiError(403, "architect_only", f"only the architect may do this; {self.store.seat_text(room, time.time())}"
                           + ('; ask them with send(to="architect")' if self.store.seat_holder(room) else ""))
        if not route.scoped:
            return
        if actor.peer is not None:
            if "room" in data:
                raise ApiError(400, "room_in_body", "'room' is not allowed: your room comes from your token")
            actor.room_id = actor.peer["room_id"]
            if route.mutates and self.store.room_state(actor.room_id) == "stopped":
                raise ApiError(423, "room_stopped", "the human stopped the room; stop working and wait for the human")
            return
        if "room" not in data:
            raise ApiError(400, "room_required", "name the room: 'room' (its id) in the body or query; "
                                                 "GET /rooms lists them")
        actor.room_id = room_id_from(data.pop("room"))
        self.store.room(actor.room_id)

    def _token_actor(self, token: str) -> Actor:
        peer, scope, expires = self._current_peer(token)
        return Actor("watch" if scope == "watch" else "peer", peer, peer["room_id"], expires)

    def _current_peer(self, token: str):
        """The peer a token names, if it is that peer's current token; else a 401 that says why."""
        claims = self.signer.claims(token)
        if claims is None or claims[3] not in ("session", "watch"):
            raise ApiError(401, "bad_token", "token is invalid; rejoin to get a new one")
        peer_id, generation, role, scope, expires = claims
        if expires < time.time():
            raise ApiError(401, "token_expired", "token expired; rejoin to get a new one")
        peer = self.store.peer_by_id(peer_id)
        if peer is None:
            raise ApiError(401, "bad_token", "token names no peer; rejoin")
        problem = self.PEER_GONE.get(peer["status"])
        if problem is not None:
            raise ApiError(401, *problem)
        if peer["generation"] != generation:
            raise ApiError(401, "token_superseded", "token was superseded (a rejoin or a name takeover); rejoin")
        return peer, scope, expires

    PEER_GONE = {"kicked": ("kicked", "the human removed you from the room; stop and ask the human"),
                 "closed": ("room_archived", "the human archived this room; stop. A new join starts a fresh room"),
                 "left": ("left", "you left the room; join again")}

    def join_caller(self, token, agent) -> JoinCaller:
        """A join resumes only with the peer's current, unexpired session token; any genuine token it shows
        still says who it was (a kicked session stays out under any name)."""
        if not token:
            return JoinCaller(agent=agent)
        claims = self.signer.claims(token)
        try:
            peer, scope, _ = self._current_peer(token)
        except ApiError:
            peer = None
        resumed = peer["id"] if peer is not None and scope == "session" else None
        return JoinCaller(resumed, claims[0] if claims else None, agent)

    def handle(self, req: Request):
        """Return (status, body, extra headers) or a Park; never raise."""
        actor = None
        try:
            self.gate(req)
            if req.method == "GET" and req.path in self.static_pages:
                return self.static_pages[req.path]
            route = ROUTES.get((req.method, req.path))
            if route is None:
                if req.path in ROUTE_METHODS:
                    raise ApiError(405, "method_not_allowed", f"{req.path} accepts {', '.join(ROUTE_METHODS[req.path])}")
                raise ApiError(404, "no_route", "no such route; see the README's HTTP API section")
            actor = self.authenticate(req, route)      # the token first: cheap, and names who is refused
            if req.method == "POST":
                ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ApiError(415, "unsupported_media_type", "POST bodies must be Content-Type: application/json")
                data = parse_json_object(req.body)
            else:
                if req.body:
                    raise ApiError(400, "unexpected_body", "GET requests carry no body; use the query string")
                data = parse_query(req.query)
            self.authorize(req, route, actor, data)
            params = validate(route.schema, data)
            if route.precheck is not None:              # what it found, the handler may reuse
                params["checked"] = route.precheck(self, actor, params)
            params["flagged"] = flags = screen_fields(route.schema, params, self.own_secrets)
            for field, rule in flags:
                if field != "content":
                    self.store.record_counted(actor.room_id, "content_flagged", actor.name,
                                            f"{req.method} {req.path}: {field} (rule {rule})", time.time())
            self.store.durability(self.promises(req))
            result = route.handler(self, actor, params)
            return result if isinstance(result, Park) else (200, result, self._room_header(actor, req.path == "/inbox"))
        except ApiError as err:
            self._note_refusal(err, actor, req)
            return err.status, err.body(), self._room_header(actor)
        except sqlite3.OperationalError as exc:
            busy = isinstance(exc, StorageBusy) or "locked" in str(exc) or "busy" in str(exc)
            if not isinstance(exc, StorageBusy):        # inside the busy window: the loop logs the 503 itself
                log(f"storage {'busy' if busy else 'error'} on {escape_for_log(req.method)} "
                    f"{escape_for_log(req.path)}: {exc}")
            return 503, {"error": {"code": "storage_busy" if busy else "storage_unavailable",
                                   "message": "storage is busy; retry in a moment" if busy else
                                   "storage failed; see the broker log"}}, {"Retry-After": "1"}
        except Exception:
            log(f"internal error on {escape_for_log(req.method)} {escape_for_log(req.path)}:\n{traceback.format_exc()}")
            return 500, {"error": {"code": "internal", "message": "internal error; see the broker log"}}

    @staticmethod
    def promises(req: Request) -> bool:
        """A POST that is not lossy is a change its client is told is stored, so its commit is fsynced. A GET
        writes only what is safe to lose: last seen, last read, acks of what an earlier read delivered."""
        route = ROUTES.get((req.method, req.path))
        return req.method == "POST" and (route is None or not route.lossy)

    def _room_header(self, actor, inbox: bool = False) -> dict:
        """Sessions learn of a pause or stop, and of unread mail, on their very next call (an inbox read
        carries the mail itself)."""
        if actor is None or actor.peer is None:
            return {}
        headers = {"X-CTL-Room": self.store.room_state(actor.peer["room_id"])}
        if actor.kind == "peer" and not inbox:
            unread = self.store.unread_summary(actor.peer)
            headers["X-CTL-Unread"] = str(unread["unread"]) + (
                f"; from={unread['latest_from']}; category={unread['latest_category']}" if unread["unread"] else "")
        return headers

    SECURITY_EVENTS = {401: "auth_failed", 403: "forbidden", 421: "wrong_host", 422: "content_filtered",
                       429: "rate_limited"}

    def _note_refusal(self, err: ApiError, actor, req: Request) -> None:
        """Refusals go to the refused peer's room, anonymous ones to the common record; each counted per minute."""
        kind = self.SECURITY_EVENTS.get(err.status)
        if kind is None:
            return
        detail = f"{escape_for_log(req.method)} {escape_for_log(req.path)[:80]}: {err.code}"
        if "rule" in err.extra:
            detail += f" (rule {err.extra['rule']} on {err.extra['field']})"
        try:
            if actor is not None and actor.peer is not None:
                self.store.record_counted(actor.peer["room_id"], kind, actor.name, detail, time.time())
            elif actor is not None and actor.kind == "operator":
                self.store.record_counted(actor.room_id, kind, "operator", detail, time.time())
            else:
                self.store.record_counted(None, kind, "unauthenticated", detail, time.time())
        except sqlite3.Error:
            pass

    def tick(self, idle: bool) -> None:
        """Once a second from the loop: leases, retention, and a WAL checkpoint when idle. Never fatal."""
        now = time.time()
        try:
            if self.store.reap(now):
                self.store.wake_everyone = True
            if now >= self.next_prune:
                self.next_prune = now + PRUNE_EVERY
                self.store.prune(now)
            self.store.prune_step()
            if idle:
                self.store.checkpoint()
        except sqlite3.Error as exc:
            log(f"tick failed (will retry): {exc}")
