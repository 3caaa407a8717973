"""Broker settings from the environment, and the limits every route enforces."""
import os
from dataclasses import dataclass

from ctl.common import StateError


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StateError(f"{name} must be a whole number, got {raw!r}")
    if not low <= value <= high:
        raise StateError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    rate_limit: int        # messages per minute per peer; a broadcast counts per recipient
    lease_seconds: int     # a peer silent for this long is dead: its claims and locks are released
    token_ttl: int         # seconds a peer token stays valid before the session must rejoin
    retention: int         # messages kept for the feed; unread ones are never dropped
    max_connections: int
    request_timeout: float = 10.0   # a request must arrive whole within this, however it drips
    join_rate: int = 60             # joins per minute per room: a runaway script cannot mint thousands of peers
    room_rate: int = 20             # new rooms per minute, for every join secret holder together

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            rate_limit=_env_int("CTL_RATE_LIMIT", 10, 1, 1_000_000),
            lease_seconds=_env_int("CTL_LEASE_SECONDS", 30, 2, 86_400),
            token_ttl=_env_int("CTL_TOKEN_TTL", 86_400, 1, 30 * 86_400),
            retention=_env_int("CTL_RETENTION", 100_000, 100, 100_000_000),
            max_connections=_env_int("CTL_MAX_CONNECTIONS", 512, 8, 10_000),
            request_timeout=float(_env_int("CTL_REQUEST_TIMEOUT", 10, 1, 300)),
            join_rate=_env_int("CTL_JOIN_RATE", 60, 1, 100_000),
            room_rate=_env_int("CTL_ROOM_RATE", 20, 1, 100_000),
        )


MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 6
IDLE_TIMEOUT = 120.0        # keep-alive connections with nothing in flight
WRITE_TIMEOUT = 10.0
MAX_WAIT_SECONDS = 60
EVENTS_KEPT = 2000
PRUNE_EVERY = 30.0          # seconds between retention passes
BUSY_WAIT_MS = 20           # how long a write waits for another process's write lock
BUSY_WINDOW = 0.25          # after such a wait failed, writes only try the lock (no wait) this long
CATEGORIES = ("info", "question", "answer", "status", "handoff", "blocker")
TASK_STATUSES = ("blocked", "ready", "claimed", "done")
ROOM_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
LIMITS = {"title": 200, "description": 4000, "content": 8000, "summary": 2000, "reason": 200,
          "path": 1024, "mem_key": 128, "mem_value": 8000, "files": 100, "depends_on": 50,
          "tasks": 100_000, "memory_keys": 256,
          "live_peers": 128,         # live sessions in one room
          "locks_per_peer": 256,
          "lock_bytes_per_peer": 32768,   # bytes of lock paths one peer may hold (a few hundred ordinary paths)
          "locks_per_room": 2048,
          "lock_bytes_per_room": 262144,  # so the lock list every hook and the dashboard fetch stays small
          "open_rooms": 256,         # rooms open at once; the operator archives done ones
          "dependents": 500,         # tasks that may wait on one task, so completing it stays cheap
          "task_list": 20,           # tasks one page of list_tasks returns; the rest are counted and paged
          "dashboard_tasks": 200,    # tasks the dashboard draws; the rest are counted
          "unread_shown": 1000,      # the dashboard counts a peer's unread mail up to this, then says "1000+"
          "recent_done": 3}          # done tasks an unfiltered listing shows
GONE_PEER_DAYS = 7                   # dead or departed peers (and their unread mail) are pruned after this

