"""Claude Code hooks that make coordination bind: thin entry points over the same client code.

    hook.py PreToolUse      before Edit/Write/MultiEdit/NotebookEdit: deny a path another peer holds;
                            otherwise take the lock for this session ("auto: <tool>") and let the edit run
    hook.py Stop            before the model ends its turn: hand it unread messages (and the human's stop
                            or pause), fenced exactly as `check` shows them; remind an idle worker once
    hook.py SessionStart    a short briefing: room, role, who is here, claims, locks, unread count
    hook.py git-pre-commit  refuse a commit that touches files other peers have locked

`--client codex|gemini` speaks that client's dialect (its tools, its form of a refusal: dialects.py).
Each reads the JSON the client sends on stdin and acts as the session's own peer, found through the
binding its MCP server wrote (see identity.py): no token ever travels in argv or the environment. With
no binding it does nothing. With the broker down it fails open with a visible warning, except for a
path it last saw locked by another peer, which stays closed.
"""
import json
import os
import sys
import time

from ctl import common, dialects, identity, user_command
from ctl.common import BrokerClient, BrokerUnavailable, StateError
from ctl.render import render_messages, when

DIALECT = dialects.CLIENTS["claude"]    # the client that runs us: --client NAME (see dialects.py)
BINDING_WAIT = 3.0          # SessionStart may run before the MCP server has joined


class Peer:
    """This session, as its binding names it, talking to the broker with its own token."""

    def __init__(self, state_dir: str, binding: dict):
        self.state_dir, self.binding = state_dir, binding
        self.client = BrokerClient(binding["port"], token=binding["token"], timeout=3,
                                   verify_key=common.read_secret(state_dir, common.HMAC_KEY_FILE))

    def call(self, method: str, path: str, body=None):
        return self.client.request(method, path, body)

    def memo_path(self) -> str:
        return identity.binding_path(self.state_dir, self.binding["agent_pid"])[:-5] + ".memo.json"

    def memo(self) -> dict:
        """What the hooks remember between runs: locks seen held by others, what the model was told."""
        try:
            with open(self.memo_path()) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def remember(self, memo: dict) -> None:
        identity.write_private(self.memo_path(), memo)


def emit(answer: dict) -> None:
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


def one_line(text: str, limit: int = 80) -> str:
    """Peer text squeezed to one printable line, quoted, for a line the model reads as data."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return json.dumps(flat[:limit] + ("..." if len(flat) > limit else ""), ensure_ascii=False)


# ---------------------------------------------------------------- PreToolUse: locks that hold


def deny(reason: str) -> None:
    emit(DIALECT.deny(reason))


def held_line(path: str, lock: dict) -> str:
    reason = lock.get("reason") or ""
    why = f" for {one_line(reason)}" if reason else ""
    return (f"{path} is locked by {lock['holder']}{why} since {when(lock['since'])}. Do not edit it: message "
            f"{lock['holder']} (send) to coordinate, or take another task.")


def pre_tool_use(event: dict, peer: Peer) -> None:
    tool = str(event.get("tool_name", ""))
    arguments = event.get("tool_input") if isinstance(event.get("tool_input"), dict) else {}
    root = peer.binding["root"]
    cwd = event.get("cwd") or root
    for target in DIALECT.write_targets(tool, arguments):
        path = os.path.realpath(target if os.path.isabs(target) else os.path.join(cwd, target))
        inside = path.startswith(root.rstrip(os.sep) + os.sep)   # a file elsewhere is not ours to guard
        if inside and not guard(path, tool, peer):
            return                                          # answered: one answer per call


def guard(path: str, tool: str, peer: Peer) -> bool:
    """Lock one file of the project for this session. False once an answer is given (a refusal or a warning):
    the client reads one answer per call."""
    root = peer.binding["root"]
    memo = peer.memo()
    try:
        status, data = peer.call("POST", "/locks", {"path": path, "reason": f"auto: {tool}"[:200]})
    except BrokerUnavailable:
        known = memo.get("held_by_others", {}).get(path)
        if known:
            deny(held_line(os.path.relpath(path, root), known) + " (As last seen: the broker is not answering.)")
        else:
            emit({"systemMessage": "Control Tower Lite: the broker is not answering, so this edit is unguarded "
                                   f"by locks. Start it: {user_command('launch')}"})
        return False
    error = data.get("error", {}) if isinstance(data, dict) else {}
    others = memo.setdefault("held_by_others", {})
    if status == 409 and "lock" in error:
        others[path] = error["lock"]
        peer.remember(memo)
        deny(held_line(error["lock"]["path"], error["lock"]))
        return False
    if status == 423:
        deny("The human stopped the room: make no more edits. Report where you are and wait for the human.")
    elif status != 200:
        emit({"systemMessage": f"Control Tower Lite could not lock {os.path.relpath(path, root)}: "
                               f"{error.get('message', status)}"})
    elif others.pop(path, None) is not None:
        peer.remember(memo)
    return status == 200


# ---------------------------------------------------------------- Stop: messages that arrive


ROOM_NOTICE = {"stopped": "STOP: the human stopped the room. Stop working: say in your reply where you are, then wait "
                          "for the human (tools that change anything are refused until the human resets the room).",
               "paused": "PAUSED: the human paused the room; messages between agents are held until it resumes."}


def stop(event: dict, peer: Peer) -> None:
    if event.get("stop_hook_active"):
        return                                              # already continuing because of us: never loop
    status, batch = peer.call("GET", "/inbox?limit=20")
    if status != 200:
        return
    memo = peer.memo()
    parts = []
    room = batch["room"]
    if room in ROOM_NOTICE and memo.get("told_room") != room:
        parts.append(ROOM_NOTICE[room])
    if batch["messages"]:
        parts.append(f"You have {len(batch['messages'])} unread message(s) from your team (now marked read):\n"
                     + render_messages(batch["messages"]))
    if not parts and room == "running" and not memo.get("told_claim"):
        reminder = claim_reminder(peer)
        if reminder:
            parts.append(reminder)
            memo["told_claim"] = True
    memo["told_room"] = room
    peer.remember(memo)
    if not parts:
        return
    emit(DIALECT.hand_over("\n\n".join(parts)))
    if batch["messages"]:                                   # handed over: only now are they read
        peer.call("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in batch["messages"]]})
    peer.call("POST", "/heartbeat", {"reach": "hooks"})


def claim_reminder(peer: Peer):
    """A worker holding nothing while tasks are ready is told once; the architect plans, and is never told."""
    status, ready = peer.call("GET", "/tasks?status=ready")
    if status != 200 or not ready["tasks"]:
        return None
    status, peers = peer.call("GET", "/peers")
    me = next((p for p in peers.get("peers", []) if p["name"] == peer.binding["name"]), None)
    if status != 200 or me is None or me["role"] != "worker":
        return None
    status, claimed = peer.call("GET", "/tasks?status=claimed")
    mine = [t for t in claimed.get("tasks", []) if t.get("assignee") == peer.binding["name"]]
    if mine:
        return None
    return (f"{ready['counts']['ready']} task(s) are ready and you hold none: call claim_task to take the next one "
            "(or tell the human why not).")


# ---------------------------------------------------------------- SessionStart: a briefing


def session_start(event: dict, peer: Peer) -> None:
    status, peers = peer.call("GET", "/peers")
    if status != 200:
        return
    _, locks = peer.call("GET", "/locks")
    _, claimed = peer.call("GET", "/tasks?status=claimed")
    _, ready = peer.call("GET", "/tasks?status=ready")
    name = peer.binding["name"]
    me = next((p for p in peers["peers"] if p["name"] == name), {"role": "worker"})
    others = [f"{p['name']} ({p['role']})" for p in peers["peers"] if p["name"] != name]
    mine = [f"#{t['id']}" for t in claimed.get("tasks", []) if t.get("assignee") == name]
    my_locks = [lock["path"] for lock in locks.get("locks", []) if lock["holder"] == name]
    unread = peer.client.headers.get("x-ctl-unread", "0").split(";")[0]
    lines = [f"Control Tower Lite: you are {name} ({me['role']}) in room {peer.binding['room']}.",
             f"Here: {', '.join(others) or 'nobody else yet'}.",
             f"Your claims: {', '.join(mine) or 'none'}; your locks: {len(my_locks)}; "
             f"ready tasks: {ready.get('counts', {}).get('ready', 0)}; unread messages: {unread}.",
             "Edits to files another peer has locked are refused; your own edits lock their files for you."]
    emit({"hookSpecificOutput": {"hookEventName": "SessionStart", "additionalContext": "\n".join(lines)}})


# ---------------------------------------------------------------- the git guard


def staged_files(top: str) -> list:
    import subprocess
    out = subprocess.run(["git", "diff", "--cached", "--name-only", "-z"], cwd=top, capture_output=True, timeout=20)
    return [os.path.realpath(os.path.join(top, name)) for name in out.stdout.decode(errors="replace").split("\0") if name]


def git_pre_commit(state_dir: str, port: int) -> int:
    """Refuse a commit touching files other peers of this project's room hold. CTL_GIT_GUARD=0 bypasses it."""
    if os.environ.get("CTL_GIT_GUARD") == "0":
        return 0
    import subprocess                   # only the git guard runs programs; the edit hook stays light
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=20)
    if top.returncode != 0:
        return 0
    root = os.path.realpath(top.stdout.strip())
    binding = identity.find_binding(state_dir)
    me = binding["name"] if binding and binding.get("root") == root else None
    try:
        client = BrokerClient(port, token=common.read_secret(state_dir, common.OPERATOR_TOKEN_FILE), timeout=3,
                              verify_key=common.read_secret(state_dir, common.HMAC_KEY_FILE))
        status, rooms = client.request("GET", "/rooms")
        room = next((r for r in rooms.get("rooms", []) if r["root"] == root and not r["archived"]), None)
        if status != 200 or room is None:
            return 0
        status, locks = client.request("GET", f"/locks?room={room['id']}")
    except (BrokerUnavailable, StateError):
        print("ctl git guard: the broker is not answering; locks were not checked.", file=sys.stderr)
        return 0
    held = {lock["abs_path"]: lock for lock in locks.get("locks", []) if lock["holder"] != me}
    clashes = [held[path] for path in staged_files(root) if path in held]
    if not clashes:
        return 0
    print("ctl git guard: this commit touches files other peers have locked:", file=sys.stderr)
    for lock in clashes:
        print(f"  {lock['path']} (locked by {lock['holder']} since {when(lock['since'])})", file=sys.stderr)
    print("Coordinate with them, or unstage those files. A human can bypass the guard: CTL_GIT_GUARD=0 git commit",
          file=sys.stderr)
    return 1


# ---------------------------------------------------------------- entry point

EVENTS = {"PreToolUse": pre_tool_use, "Stop": stop, "SessionStart": session_start}


def find_peer(state_dir: str, wait: float):
    """This session's peer; a session that has not joined yet (it joins on first use) is asked to, now."""
    deadline = time.monotonic() + wait
    while True:
        binding = identity.find_binding(state_dir)
        if binding is not None and not binding.get("token"):
            answer = identity.ask_to_join(binding)
            binding = identity.find_binding(state_dir)
            if not (binding and binding.get("token")):
                print(f"ctl hook: the session could not join ({answer})", file=sys.stderr)
                return None
        if binding is not None or time.monotonic() >= deadline:
            return Peer(state_dir, binding) if binding else None
        time.sleep(0.1)


def main(argv=None) -> int:
    """Parsed by hand: argparse would cost every edit a few milliseconds of import."""
    argv = sys.argv[1:] if argv is None else argv
    global DIALECT
    options = {}
    while argv and argv[0] in ("--port", "--state-dir", "--client") and len(argv) > 1:
        options[argv[0]], argv = argv[1], argv[2:]
    port_arg, state_arg = options.get("--port"), options.get("--state-dir")
    if len(argv) != 1 or argv[0] not in (*EVENTS, "git-pre-commit") or \
            options.get("--client", "claude") not in dialects.CLIENTS:
        print(f"usage: hook.py [--port N] [--state-dir DIR] [--client {{{','.join(dialects.CLIENTS)}}}] "
              f"{{{','.join([*EVENTS, 'git-pre-commit'])}}}", file=sys.stderr)
        return 2
    DIALECT = dialects.CLIENTS[options.get("--client", "claude")]
    try:
        state_dir = common.resolve_state_dir(state_arg)
        if argv[0] == "git-pre-commit":
            return git_pre_commit(state_dir, common.resolve_port(port_arg))
        try:
            event = json.loads(sys.stdin.read() or "{}")
        except ValueError:
            return 0
        peer = find_peer(state_dir, BINDING_WAIT if argv[0] == "SessionStart" else 0)
        if peer is None or not isinstance(event, dict):
            return 0                                        # not a coordinated session: nothing to do
        try:
            EVENTS[argv[0]](event, peer)
        finally:
            peer.client.close()
    except Exception as exc:                # a hook never breaks the session: it fails open, visibly
        if argv[0] == "PreToolUse":
            emit({"systemMessage": f"Control Tower Lite hook could not check locks ({exc}); edit unguarded."})
        elif not isinstance(exc, (BrokerUnavailable, StateError, OSError)):
            print(f"ctl hook: {exc!r}", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
