"""Peer-written text as a model sees it: inside a fence with a nonce the writer could not guess, with the
broker's provenance (sender, role, origin, category, time, filter flag) outside it. One place, so the MCP
server, the watcher and the hooks show messages exactly alike."""
import os
import time


def fence(lines: list, nonce: str, label: str = "") -> str:
    """Peer-written text inside a fence the writer could not have guessed; look-alike fences defanged."""
    body = "\n".join(line.replace("<<<", "< < <").replace(">>>", "> > >") for line in lines)
    tag = f" {label}" if label else ""
    return f"<<<peer-text {nonce}{tag}\n{body}\npeer-text {nonce}>>>"


def flag_note(view: dict, field: str) -> str:
    """What the filter flagged in one peer-written field of a task, lock or memory entry, said as for a message."""
    rule = (view.get("flagged") or {}).get(field)
    return f", FLAGGED by the filter (rule {rule})" if rule else ""


def when(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def new_nonce() -> str:
    """A fence's nonce: secrets.token_hex(6), without importing secrets (a start-up cost)."""
    return os.urandom(6).hex()


def render_messages(messages: list) -> str:
    nonce = new_nonce()
    parts = []
    for m in messages:
        flag = f", FLAGGED by the filter (rule {m['flagged']})" if m.get("flagged") else ""
        parts.append(f"#{m['id']} from {m['from']} ({m['from_role']}, {m['origin']}) to {m['to']}, "
                     f"{m['category']}{flag}, {when(m['at'])}:\n{fence(m['content'].splitlines() or [''], nonce)}")
    return "\n".join(parts)
