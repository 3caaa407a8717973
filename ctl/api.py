"""What the broker answers: request validation by schema dicts, and the route table that maps
(method, path) to a handler, who may call it, and the fields it takes."""
import os
import re
import time
from dataclasses import dataclass

from ctl import common
from ctl.config import CATEGORIES, LIMITS, MAX_WAIT_SECONDS, TASK_STATUSES
from ctl.errors import ApiError
from ctl.names import NAME_RE
from ctl.textfilter import screen_text


@dataclass(frozen=True)
class Field:
    kind: str                 # text | name | target | enum | int | ids | texts | hex | name_or_null | token
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


def _check_text(field, name, value):
    if not isinstance(value, str):
        raise ApiError(400, "bad_type", f"{name} must be a string")
    _refuse_longer(name, value, field.limit)      # before spending the filter's time
    value = screen_text(name, value)
    _refuse_longer(name, value, field.limit)      # NFKC can lengthen text
    if field.minimum and not value.strip():
        raise ApiError(400, "too_short", f"{name} must not be empty")
    return value


def _check_name(field, name, value):
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ApiError(400, "bad_name", f"{name} must be 1-32 characters of letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
    return value


def _check_target(field, name, value):
    return "*" if value == "*" else _check_name(field, name, value)


def _check_enum(field, name, value):
    if value not in field.choices:
        raise ApiError(400, "bad_value", f"{name} must be one of {', '.join(field.choices)}")
    return value


def _check_int(field, name, value):
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,19}", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not field.minimum <= value <= field.limit:
        raise ApiError(400, "bad_value", f"{name} must be a whole number from {field.minimum} to {field.limit}")
    return value


def _check_ids(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} task ids")
    ids = [_check_int(Field("int", limit=2**53, minimum=1), name, v) for v in value]
    if len(set(ids)) != len(ids):
        raise ApiError(400, "duplicate_ids", f"{name} lists a task id twice")
    return ids


def _check_texts(field, name, value):
    if not isinstance(value, list) or len(value) > field.limit:
        raise ApiError(400, "bad_type", f"{name} must be a list of at most {field.limit} strings")
    return [_check_text(Field("text", limit=LIMITS["path"]), name, v) for v in value]


def _check_hex(field, name, value):
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16,64}", value):
        raise ApiError(400, "bad_value", f"{name} must be 16-64 lowercase hex digits")
    return value


def _check_name_or_null(field, name, value):
    return None if value is None else _check_name(field, name, value)


def _check_token(field, name, value):
    if not isinstance(value, str) or len(value) > 512:
        raise ApiError(400, "bad_type", f"{name} must be a token string")
    return value


def _check_root(field, name, value):
    value = _check_text(field, name, value)
    if not os.path.isabs(value) or not os.path.isdir(value):
        raise ApiError(400, "bad_root", f"{name} must be the absolute path of an existing directory")
    return os.path.realpath(value)


CHECKS = {"text": _check_text, "name": _check_name, "target": _check_target, "enum": _check_enum,
          "int": _check_int, "ids": _check_ids, "texts": _check_texts, "hex": _check_hex,
          "name_or_null": _check_name_or_null, "token": _check_token, "root": _check_root}


def validate(schema: dict, data: dict) -> dict:
    for key in data:
        if key not in schema:
            if key in IDENTITY_FIELDS:
                raise ApiError(400, "identity_in_body",
                               f"'{key}' is not allowed: your identity comes from your token, never from the body")
            allowed = ", ".join(schema) or "no fields"
            raise ApiError(400, "unknown_field", f"unknown field '{key}'; this route accepts: {allowed}")
    clean = {}
    for key, field in schema.items():
        if key not in data or (data[key] is None and field.kind != "name_or_null"):
            if field.required:
                raise ApiError(400, "missing_field", f"'{key}' is required")
            clean[key] = field.default
        else:
            clean[key] = CHECKS[field.kind](field, key, data[key])
    return clean


# ---------------------------------------------------------------- routes


@dataclass
class Park:
    """A waiting inbox read: retried when the peer is woken, answered empty at the deadline."""
    peer_id: int
    deadline: float
    attempt: object           # attempt(final: bool) -> dict | None


@dataclass(frozen=True)
class Route:
    handler: object
    who: frozenset            # actor kinds allowed
    schema: dict
    architect: bool = False   # peers must hold the architect seat (the operator always may)


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
        answer["proof"] = common.challenge_proof(broker.hmac_key, q["challenge"])
    return answer


def r_join(broker, actor, b):
    now = time.time()
    resumed = None
    if b["resume"]:
        claims = broker.signer.claims(b["resume"])
        resumed = claims[0] if claims and claims[3] == "session" else None
    peer = broker.store.join(b["name"], b["role"], b["summary"], b["root"], resumed, now)
    return {"token": broker.mint(peer, "session"), "watch_token": broker.mint(peer, "watch"),
            "name": peer["name"], "role": peer["role"], "lease_seconds": broker.settings.lease_seconds,
            "room": broker.store.room_state(),
            "peers": [p for p in broker.store.list_peers(now) if p["name"] != peer["name"]]}


def r_leave(broker, actor, b):
    broker.store.leave(actor.peer, time.time())
    return {"left": actor.name}


def r_heartbeat(broker, actor, b):
    return broker.store.heartbeat(actor.peer, b["summary"], time.time())


def r_peers(broker, actor, q):
    return {"peers": broker.store.list_peers(time.time())}


def r_send(broker, actor, b):
    return broker.store.send(actor, b["to"], b["content"], b["category"], time.time())


def r_inbox(broker, actor, q):
    peer_id = actor.peer["id"]

    def attempt(final):
        batch = broker.store.inbox(peer_id, q["limit"])
        return batch if batch["messages"] or final or batch["room"] == "stopped" else None

    found = attempt(final=q["wait"] == 0)
    if found is not None:
        return found
    return Park(peer_id, time.monotonic() + q["wait"], attempt)


def r_ack(broker, actor, b):
    return broker.store.ack(actor.peer["id"], b["ids"])


def r_create_task(broker, actor, b):
    return broker.store.create_task(actor, b["title"], b["description"], b["depends_on"], time.time())


def r_update_task(broker, actor, b):
    fields = {k: v for k, v in b.items() if k != "task_id" and v is not None}
    return broker.store.update_task(b["task_id"], fields, time.time())


def r_tasks(broker, actor, q):
    return broker.store.list_tasks(q["status"])


def r_claim(broker, actor, b):
    return broker.store.claim(actor.peer, b["task_id"], time.time())


def r_complete(broker, actor, b):
    return broker.store.complete(actor, b["task_id"], b["summary"], b["files"], time.time())


def r_lock(broker, actor, b):
    return broker.store.lock(actor.peer, b["path"], b["reason"], time.time())


def r_unlock(broker, actor, b):
    return broker.store.unlock(actor, b["path"], time.time())


def r_locks(broker, actor, q):
    return {"locks": broker.store.list_locks()}


def r_set_memory(broker, actor, b):
    return broker.store.set_memory(actor, b["key"], b["value"], time.time())


def r_get_memory(broker, actor, q):
    return broker.store.get_memory(q["key"])


def r_state(broker, actor, q):
    view = broker.store.snapshot(q["since"], q["after_message"], q["after_event"], time.time())
    view["health"] = broker.health()
    view["viewer"] = actor.kind
    return view


def r_room(state):
    return lambda broker, actor, b: broker.store.set_room_state(state, time.time())


def r_kick(broker, actor, b):
    return broker.store.kick(b["name"], time.time())


def r_inject(broker, actor, b):
    return broker.store.send(actor, b["to"], b["content"], b["category"], time.time())


def r_release(broker, actor, b):
    return broker.store.release_task(b["task_id"], time.time())


def r_architect(broker, actor, b):
    return broker.store.set_architect(b["name"], time.time())


TASK_ID = Field("int", required=True, limit=2**53)
SEND_SCHEMA = {"to": Field("target", required=True),
               "content": Field("text", required=True, limit=LIMITS["content"]),
               "category": Field("enum", choices=CATEGORIES, default="info")}

ROUTES = {
    ("GET", "/health"): Route(r_health, PUBLIC, {"challenge": Field("hex")}),
    ("POST", "/join"): Route(r_join, JOINING, {
        "name": Field("name", required=True),
        "role": Field("enum", choices=("worker", "architect")),
        "summary": Field("text", limit=LIMITS["summary"], minimum=0, default=""),
        "root": Field("root", limit=LIMITS["path"]),
        "resume": Field("token")}),
    ("POST", "/leave"): Route(r_leave, PEER, {}),
    ("POST", "/heartbeat"): Route(r_heartbeat, PEER, {"summary": Field("text", limit=LIMITS["summary"], minimum=0)}),
    ("GET", "/peers"): Route(r_peers, READERS, {}),
    ("POST", "/messages"): Route(r_send, PEER, SEND_SCHEMA),
    ("GET", "/inbox"): Route(r_inbox, INBOX_READERS, {
        "wait": Field("int", limit=MAX_WAIT_SECONDS, minimum=0, default=0),
        "limit": Field("int", limit=100, default=20)}),
    ("POST", "/inbox/ack"): Route(r_ack, INBOX_READERS, {"ids": Field("ids", required=True, limit=100)}),
    ("POST", "/tasks"): Route(r_create_task, PEER_OR_OPERATOR, {
        "title": Field("text", required=True, limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0, default=""),
        "depends_on": Field("ids", limit=LIMITS["depends_on"], default=[])}, architect=True),
    ("POST", "/tasks/update"): Route(r_update_task, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "title": Field("text", limit=LIMITS["title"]),
        "description": Field("text", limit=LIMITS["description"], minimum=0),
        "depends_on": Field("ids", limit=LIMITS["depends_on"])}, architect=True),
    ("GET", "/tasks"): Route(r_tasks, READERS, {"status": Field("enum", choices=TASK_STATUSES)}),
    ("POST", "/tasks/claim"): Route(r_claim, PEER, {"task_id": Field("int", limit=2**53)}),
    ("POST", "/tasks/complete"): Route(r_complete, PEER_OR_OPERATOR, {
        "task_id": TASK_ID,
        "summary": Field("text", required=True, limit=LIMITS["summary"]),
        "files": Field("texts", limit=LIMITS["files"], default=[])}),
    ("POST", "/locks"): Route(r_lock, PEER, {
        "path": Field("text", required=True, limit=LIMITS["path"]),
        "reason": Field("text", limit=LIMITS["reason"], minimum=0, default="")}),
    ("POST", "/locks/release"): Route(r_unlock, PEER_OR_OPERATOR, {
        "path": Field("text", required=True, limit=LIMITS["path"])}),
    ("GET", "/locks"): Route(r_locks, READERS, {}),
    ("POST", "/memory"): Route(r_set_memory, PEER_OR_OPERATOR, {
        "key": Field("text", required=True, limit=LIMITS["mem_key"]),
        "value": Field("text", required=True, limit=LIMITS["mem_value"])}, architect=True),
    ("GET", "/memory"): Route(r_get_memory, READERS, {"key": Field("text", limit=LIMITS["mem_key"])}),
    ("GET", "/state"): Route(r_state, OBSERVERS, {
        "since": Field("int", limit=2**62, minimum=0),
        "after_message": Field("int", limit=2**62, minimum=0, default=0),
        "after_event": Field("int", limit=2**62, minimum=0, default=0)}),
    ("POST", "/operator/pause"): Route(r_room("paused"), OPERATOR, {}),
    ("POST", "/operator/resume"): Route(r_room("running"), OPERATOR, {}),
    ("POST", "/operator/stop"): Route(r_room("stopped"), OPERATOR, {}),
    ("POST", "/operator/reset"): Route(r_room("running"), OPERATOR, {}),
    ("POST", "/operator/kick"): Route(r_kick, OPERATOR, {"name": Field("name", required=True)}),
    ("POST", "/operator/inject"): Route(r_inject, OPERATOR, SEND_SCHEMA),
    ("POST", "/operator/unlock"): Route(r_unlock, OPERATOR, {"path": Field("text", required=True, limit=4096)}),
    ("POST", "/operator/release"): Route(r_release, OPERATOR, {"task_id": TASK_ID}),
    ("POST", "/operator/architect"): Route(r_architect, OPERATOR, {"name": Field("name_or_null", required=True)}),
}
ROUTE_METHODS = {}
for _method, _path in ROUTES:
    ROUTE_METHODS.setdefault(_path, []).append(_method)
