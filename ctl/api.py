"""What the broker answers: request validation by schema dicts, and the route table that maps
(method, path) to a handler, who may call it, and the fields it takes."""
import os
import re
import time
from dataclasses import dataclass

from ctl import common
from ctl.config import CATEGORIES, LIMITS, MAX_WAIT_SECONDS, ROOM_NAME_PATTERN, TASK_STATUSES
from ctl.errors import ApiError
from ctl.names import NAME_RE
from ctl.store import room_name_for
from ctl.textfilter import screen

ROOM_NAME_RE = re.compile(ROOM_NAME_PATTERN)
DIGITS = re.compile(r"[0-9]{1,19}")
HEX = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True)
class Field:
    kind: str                 # a key of CHECKS
    required: bool = False
    limit: int = 0            # max length (text), max items (lists), max value (int)
    minimum: int = 1          # min length (text) or min value (int)
    choices: tuple = ()
    default: object = None


IDENTITY_FIELDS = {"from", "sender", "sender_id", "sender_name", "from_peer", "peer_id", "as", "identity",
                   "author", "as_peer", "on_behalf_of", "from_role", "origin", "sender_role"}


def _refuse_longer(name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ApiError(400, "too_long", f"{name} is {len(text)} characters; the limit is {limit}")


def safe_name(key) -> str:
    """A field name as it may appear in an error: printable ASCII, short; never the raw input."""
    text = key if isinstance(key, str) else repr(key)
    return text.encode("ascii", "backslashreplace").decode("ascii")[:40]


def _check_text(field, name, value):
    """Type and size only: the content filter runs later (screen_fields), after the route's cheap refusals."""
    if not isinstance(value, str):
        raise ApiError(400, "bad_type", f"{name} must be a string")
    _refuse_longer(name, value, field.limit)
    if field.minimum and not value.strip():
        raise ApiError(400, "too_short", f"{name} must not be empty")
    return value


def _check_name(field, name, value):
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ApiError(400, "bad_name", f"{name} must be 1-32 characters of letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
    return value


def _check_room_name(field, name, value):
    if not isinstance(value, str) or not ROOM_NAME_RE.fullmatch(value):
        raise ApiError(400, "bad_room", f"{name} must be 1-64 characters of letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit (check CTL_ROOM)")
    return value


def _check_target(field, name, value):
    return "*" if value == "*" else _check_name(field, name, value)


def _check_enum(field, name, value):
    if value not in field.choices:
        raise ApiError(400, "bad_value", f"{name} must be one of {', '.join(field.choices)}")
    return value


def _check_int(field, name, value):
    """JSON integers only in bodies; a query string's ASCII digits are its only spelling of a number."""
    if isinstance(value, str) and field.kind == "query_int" and DIGITS.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not field.minimum <= value <= field.limit:
        raise ApiError(400, "bad_value", f"{name} must be a whole number from {field.minimum} to {field.limit}")
    return value


def _check_ids(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} task ids")
    ids = [_check_int(TASK_ID, name, v) for v in value]
    if len(set(ids)) != len(ids):
        raise ApiError(400, "duplicate_ids", f"{name} lists a task id twice")
    return ids


def _check_texts(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} strings")
    return [_check_text(Field("text", limit=LIMITS["path"]), name, v) for v in value]


def _check_hex(field, name, value):
    if not isinstance(value, str) or not HEX.fullmatch(value):
        raise ApiError(400, "bad_value", f"{name} must be 16-64 lowercase hex digits")
    return value


def _check_name_or_null(field, name, value):
    return None if value is None else _check_name(field, name, value)


def _check_token(field, name, value):
    if not isinstance(value, str) or len(value) > 512:
        raise ApiError(400, "bad_type", f"{name} must be a token string")
    return value


def _check_root(field, name, value):
    """A project root the broker can check: an existing directory of this user, not / nor the home itself."""
    value = _check_text(field, name, value)
    if not os.path.isabs(value) or not os.path.isdir(value):
        raise ApiError(400, "bad_root", f"{name} must be the absolute path of an existing directory")
    real = os.path.realpath(value)
    if real == "/" or real == os.path.realpath(os.path.expanduser("~")):
        raise ApiError(400, "bad_root", f"{name} is too broad to be one project (it is / or your home); "
                                        "start the session inside a project folder, or set CTL_ROOM")
    if os.stat(real).st_uid != os.getuid():
        raise ApiError(400, "bad_root", f"{name} belongs to another user; a project root must be yours")
    return real


CHECKS = {"text": _check_text, "name": _check_name, "target": _check_target, "enum": _check_enum,
          "int": _check_int, "query_int": _check_int, "ids": _check_ids, "texts": _check_texts,
          "hex": _check_hex, "name_or_null": _check_name_or_null, "token": _check_token, "root": _check_root,
          "room_name": _check_room_name}


SCREENED = ("text", "texts", "root")      # the kinds of field that hold free text


def validate(schema: dict, data: dict) -> dict:
    """Fields, types and sizes: cheap checks, linear in the body."""
    for key in data:
        if key not in schema:
            if key in IDENTITY_FIELDS:
                raise ApiError(400, "identity_in_body",
                               f"'{key}' is not allowed: your identity comes from your token, never from the body")
            allowed = ", ".join(schema) or "no fields"
            raise ApiError(400, "unknown_field", f"unknown field '{safe_name(key)}'; this route accepts: {allowed}")
    clean = {}
    for key, field in schema.items():
        if key not in data or (data[key] is None and field.kind != "name_or_null"):
            if field.required:
                raise ApiError(400, "missing_field", f"'{key}' is required")
            clean[key] = field.default
        else:
            clean[key] = CHECKS[field.kind](field, key, data[key])
    return clean


def screen_fields(schema: dict, params: dict, secrets) -> list:
    """The content filter over every free-text field: the costly check, so it runs last (after the route's
    precheck). Refuses with 422, or returns what it flagged, as (field, rule) pairs."""
    flags = []
    for key, field in schema.items():
        value = params.get(key)
        if field.kind in SCREENED and value is not None:
            for text in value if isinstance(value, list) else (value,):
                rule = screen(key, text, secrets)
                if rule:
                    flags.append((key, rule))
    return flags


# ---------------------------------------------------------------- routes


@dataclass
class Park:
    """A waiting inbox read: retried when the peer is woken, answered empty at the deadline."""
    peer_id: int
    deadline: float
    attempt: object           # attempt(final: bool) -> dict | None
    broad: bool = False       # retried after every change of the store, not only on mail to its peer


@dataclass(frozen=True)
class Route:
    handler: object           # handler(broker, actor, params) -> dict | Park; params["flagged"]: filter flags
    who: frozenset            # actor kinds allowed
    schema: dict
    architect: bool = False   # peers must hold the architect seat (the operator always may)
    mutates: bool = False     # an agent change: refused while the room is stopped
    scoped: bool = True       # acts on one room: a peer's own, or the one an operator or observer names
    lossy: bool = False       # a POST whose writes are safe to lose (acks, heartbeats): its commit skips the fsync
    precheck: object = None   # precheck(broker, actor, params): refusals cheaper than the content filter, run
                              # first; what it returns is params["checked"] for the handler


PEER = frozenset({"peer"})
PEER_OR_OPERATOR = frozenset({"peer", "operator"})
READERS = frozenset({"peer", "operator", "observer"})
INBOX_READERS = frozenset({"peer", "watch"})
OPERATOR = frozenset({"operator"})
OBSERVERS = frozenset({"operator", "observer"})
PUBLIC = frozenset({"public"})
JOINING = frozenset({"join"})


def r_health(broker, actor, q):
    answer = {"ok": True}
    if q["challenge"]:
        answer["proof"] = common.challenge_proof(broker.hmac_key, q["challenge"], broker.port)
    return answer


def r_mint_link(broker, actor, b):
    """A one-time dashboard link for the caller's own kind of access; via "file" also writes the handoff file."""
    return broker.handoffs.mint(actor.kind, time.time(), b["via"] == "file")


def r_redeem_link(broker, actor, b):
    """The dashboard trades its one-time code for the token, once."""
    kind = broker.handoffs.redeem(b["code"], time.time())
    token = broker.operator_token if kind == "operator" else broker.observer_token
    return {"token": token.decode(), "viewer": kind}


def r_join(broker, actor, b):
    """The room is the project root the session sent (checked above), or the name CTL_ROOM gave."""
    now = time.time()
    if b["room"] is None and b["root"] is None:
        raise ApiError(400, "no_room", "send root (your project folder) or room (a room name) to join")
    key = f"name:{b['room']}" if b["room"] else f"root:{b['root']}"
    name = b["room"] or room_name_for(b["root"])
    peer = broker.store.join(b["name"], b["role"], b["summary"], b["root"], key, name,
                             broker.join_caller(b["resume"], b["agent"]), now, b["flagged"])
    return {"token": broker.mint(peer, "session"), "watch_token": broker.mint(peer, "watch"),
            "name": peer["name"], "role": peer["role"], "lease_seconds": broker.settings.lease_seconds,
            "room": broker.store.room_state(peer["room_id"]), "room_name": broker.store.room(peer["room_id"])["name"],
            "peers": [p for p in broker.store.list_peers(peer["room_id"], now) if p["name"] != peer["name"]],
            **broker.store.unread_summary(peer)}


def r_leave(broker, actor, b):
    broker.store.leave(actor.peer, time.time())
    return {"left": actor.name}


def r_heartbeat(broker, actor, b):
    answer = broker.store.heartbeat(actor.peer, b["summary"], b["reach"], time.time(), b["flagged"])
    fresh = broker.refreshed_token(actor)
    return {**answer, "token": fresh} if fresh else answer


def r_peers(broker, actor, q):
    return {"peers": broker.store.list_peers(actor.room_id, time.time())}


def r_send(broker, actor, b):
    flag = next((rule for field, rule in b["flagged"] if field == "content"), None)
    return broker.store.send(actor, b["to"], b["content"], b["category"], flag, time.time(), b.get("checked"))


def r_inbox(broker, actor, q):
    """Unread mail, waiting up to `wait` seconds for some. A session's idle waiter (hook.py Wait) also names
    the room state it last told the model (`state`) and the ready tasks it knew of (`ready`): the read then
    also answers when the room's state differs, or when more tasks are ready for this worker, who holds none."""
    peer_id = actor.peer["id"]
    watches_room = q["state"] is not None or q["ready"] is not None

    def news(peer, batch) -> bool:
        if watches_room:
            batch["wake"] = broker.store.room_wakes.get(peer["room_id"], "on")
            if batch["wake"] == "never":
                return True                     # the waiter ends at once: the human turned waking off
        if q["ready"] is not None:
            batch["ready"] = broker.store.ready_for(peer)
        if batch["messages"] or batch.get("ready", 0) > (q["ready"] or 0):
            return True
        return batch["room"] != q["state"] if watches_room else batch["room"] == "stopped"

    def attempt(final):
        peer = broker.store.peer_by_id(peer_id)
        gone = broker.PEER_GONE.get(peer["status"])
        if gone is not None:                    # kicked, archived or left while waiting: say so, do not wait on
            raise ApiError(401, *gone)
        batch = broker.store.inbox(peer, q["limit"])
        return batch if news(peer, batch) or final else None

    if actor.kind == "watch" and q["wait"]:
        broker.store.note_reach(actor.peer, "watcher")
    first = broker.store.inbox(actor.peer, q["limit"], q["ack"], time.time())
    if news(actor.peer, first) or q["wait"] == 0:
        return first
    return Park(peer_id, time.monotonic() + q["wait"], attempt, watches_room)


def r_ack(broker, actor, b):
    return broker.store.ack(actor.peer, b["ids"], time.time())


def r_receipts(broker, actor, q):
    return {"messages": broker.store.receipts(actor.peer)}


def r_create_task(broker, actor, b):
    return broker.store.create_task(actor, b["title"], b["description"], b["depends_on"], time.time(), b["flagged"])


def r_update_task(broker, actor, b):
    fields = {k: v for k, v in b.items() if k in ("title", "description", "depends_on") and v is not None}
    return broker.store.update_task(actor, b["task_id"], fields, time.time(), b["flagged"])


def r_tasks(broker, actor, q):
    return broker.store.list_tasks(actor.room_id, q["status"], q["after"])


def r_claim(broker, actor, b):
    return broker.store.claim(actor.peer, b["task_id"], time.time())


def r_complete(broker, actor, b):
    return broker.store.complete(actor, b["task_id"], b["summary"], b["files"], time.time(), b["flagged"])


def p_send(broker, actor, b):
    return broker.store.check_send(actor, b["to"], time.time())


def p_complete(broker, actor, b):
    broker.store.check_completion(actor, b["task_id"])


def r_lock(broker, actor, b):
    return broker.store.lock(actor.peer, b["path"], b["reason"], time.time(), b["flagged"])


def r_unlock(broker, actor, b):
    return broker.store.unlock(actor, b["path"], time.time())


def r_locks(broker, actor, q):
    return {"locks": broker.store.list_locks(actor.room_id)}


def r_violation(broker, actor, b):
    return broker.store.report_violation(actor.peer, b["path"], b["tool"], b["seconds"], time.time())


def r_set_memory(broker, actor, b):
    return broker.store.set_memory(actor, b["key"], b["value"], time.time(), b["flagged"])


def r_get_memory(broker, actor, q):
    return broker.store.get_memory(actor.room_id, q["key"])


def r_rooms(broker, actor, q):
    return {"rooms": broker.store.list_rooms(time.time()), "viewer": actor.kind}


def r_state(broker, actor, q):
    view = broker.store.snapshot(actor.room_id, q["since"], q["after_message"], q["after_event"], time.time())
    view["health"] = broker.health()
    view["viewer"] = actor.kind
    return view


def r_room_state(state, lift_kicks=False):
    return lambda broker, actor, b: broker.store.set_room_state(actor.room_id, state, lift_kicks, time.time())


def r_wake(broker, actor, b):
    return broker.store.set_wake(actor.room_id, b["wake"], time.time())


def r_archive(broker, actor, b):
    return broker.store.archive_room(actor.room_id, time.time())


def r_kick(broker, actor, b):
    return broker.store.kick(actor.room_id, b["name"], time.time())


def r_release(broker, actor, b):
    return broker.store.release_task(actor.room_id, b["task_id"], time.time())


def r_architect(broker, actor, b):
    return broker.store.set_architect(actor.room_id, b["name"], time.time())


TASK_ID = Field("int", required=True, limit=2**53)
SEND_SCHEMA = {"to": Field("target", required=True),
               "content": Field("text", required=True, limit=LIMITS["content"]),
               "category": Field("enum", choices=CATEGORIES, default="info")}
REACHES = ("push", "watcher", "hooks", "tool")
ROOM_STATES = ("running", "paused", "stopped")

ROUTES = {
    ("GET", "/health"): Route(r_health, PUBLIC, {"challenge": Field("hex")}, scoped=False),
    ("POST", "/link"): Route(r_mint_link, OBSERVERS, {"via": Field("enum", choices=("link", "file"), default="link")},
                             scoped=False),
    ("POST", "/link/redeem"): Route(r_redeem_link, PUBLIC, {"code": Field("token", required=True)}, scoped=False),
    ("POST", "/join"): Route(r_join, JOINING, {
        "name": Field("name", required=True),
        "role": Field("enum", choices=("worker", "architect")),
        "summary": Field("text", limit=LIMITS["summary"], minimum=0, default=""),
        "root": Field("root", limit=LIMITS["path"]),
        "room": Field("room_name"),
        "resume": Field("token"),
        "agent": Field("hex")}, scoped=False),
    ("POST", "/leave"): Route(r_leave, PEER, {}),
    ("POST", "/heartbeat"): Route(r_heartbeat, PEER, {
        "summary": Field("text", limit=LIMITS["summary"], minimum=0),
        "reach": Field("enum", choices=REACHES)}, lossy=True),
    ("GET", "/peers"): Route(r_peers, READERS, {}),
    ("POST", "/messages"): Route(r_send, PEER, SEND_SCHEMA, mutates=True, precheck=p_send),
    ("GET", "/inbox"): Route(r_inbox, INBOX_READERS, {
        "wait": Field("query_int", limit=MAX_WAIT_SECONDS, minimum=0, default=0),
        "limit": Field("query_int", limit=100, default=20),
        "ack": Field("query_int", limit=2**62),
        "state": Field("enum", choices=ROOM_STATES),
        "ready": Field("query_int", limit=2**53, minimum=0)}),
    ("POST", "/inbox/ack"): Route(r_ack, INBOX_READERS, {"ids": Field("ids", required=True, limit=100)}, lossy=True),
    ("GET", "/receipts"): Route(r_receipts, PEER, {}),
    ("POST", "/tasks"): Route(r_create_task, PEER_OR_OPERATOR, {
        "title": Field("text", required=True, limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0, default=""),
        "depends_on": Field("ids", limit=LIMITS["depends_on"], default=[])}, architect=True, mutates=True),
    ("POST", "/tasks/update"): Route(r_update_task, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "title": Field("text", limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0),
        "depends_on": Field("ids", limit=LIMITS["depends_on"])}, architect=True, mutates=True),
    ("GET", "/tasks"): Route(r_tasks, READERS, {"status": Field("enum", choices=TASK_STATUSES),
                                                "after": Field("query_int", limit=2**53, minimum=0)}),
    ("POST", "/tasks/claim"): Route(r_claim, PEER, {"task_id": Field("int", limit=2**53)}, mutates=True),
    ("POST", "/tasks/complete"): Route(r_complete, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "summary": Field("text", required=True, limit=LIMITS["summary"]),
        "files": Field("texts", limit=LIMITS["files"], default=[])}, mutates=True, precheck=p_complete),
    ("POST", "/locks"): Route(r_lock, PEER, {
        "path": Field("text", required=True, limit=LIMITS["path"]),
        "reason": Field("text", limit=LIMITS["reason"], minimum=0, default="")}, mutates=True),
    ("POST", "/locks/release"): Route(r_unlock, PEER_OR_OPERATOR, {
        "path": Field("text", required=True, limit=LIMITS["path"])}),
    ("GET", "/locks"): Route(r_locks, READERS, {}),
    ("POST", "/locks/violation"): Route(r_violation, PEER, {
        "path": Field("text", required=True, limit=LIMITS["path"]),
        "tool": Field("name", required=True),
        "seconds": Field("int", required=True, limit=86400, minimum=0)}),
    ("POST", "/memory"): Route(r_set_memory, PEER_OR_OPERATOR, {
        "key": Field("text", required=True, limit=LIMITS["mem_key"]),
        "value": Field("text", required=True, limit=LIMITS["mem_value"])}, architect=True, mutates=True),
    ("GET", "/memory"): Route(r_get_memory, READERS, {"key": Field("text", limit=LIMITS["mem_key"])}),
    ("GET", "/rooms"): Route(r_rooms, OBSERVERS, {}, scoped=False),
    ("GET", "/state"): Route(r_state, OBSERVERS, {
        "since": Field("query_int", limit=2**62, minimum=0),
        "after_message": Field("query_int", limit=2**62, minimum=0, default=0),
        "after_event": Field("query_int", limit=2**62, minimum=0, default=0)}),
    ("POST", "/operator/pause"): Route(r_room_state("paused"), OPERATOR, {}),
    ("POST", "/operator/resume"): Route(r_room_state("running"), OPERATOR, {}),
    ("POST", "/operator/stop"): Route(r_room_state("stopped"), OPERATOR, {}),
    ("POST", "/operator/reset"): Route(r_room_state("running", lift_kicks=True), OPERATOR, {}),
    ("POST", "/operator/archive"): Route(r_archive, OPERATOR, {}),
    ("POST", "/operator/wake"): Route(r_wake, OPERATOR, {"wake": Field("enum", choices=("on", "never"), required=True)}),
    ("POST", "/operator/kick"): Route(r_kick, OPERATOR, {"name": Field("name", required=True)}),
    ("POST", "/operator/inject"): Route(r_send, OPERATOR, SEND_SCHEMA, precheck=p_send),
    ("POST", "/operator/unlock"): Route(r_unlock, OPERATOR, {"path": Field("text", required=True, limit=4096)}),
    ("POST", "/operator/release"): Route(r_release, OPERATOR, {"task_id": TASK_ID}),
    ("POST", "/operator/architect"): Route(r_architect, OPERATOR, {"name": Field("name_or_null", required=True)}),
}
ROOM_FIELD = Field("query_int", required=True, limit=2**53)


def room_id_from(value) -> int:
    """How an operator or observer names a room: its id (a JSON integer, or ASCII digits in a query)."""
    return _check_int(ROOM_FIELD, "room", value)


ROUTE_METHODS = {}
for _method, _path in ROUTES:
    ROUTE_METHODS.setdefault(_path, []).append(_method)
