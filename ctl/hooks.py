"""Claude Code hooks that make coordination bind: thin entry points over the same client code.

    hook.py PreToolUse      before Edit/Write/NotebookEdit: deny a path another peer holds; otherwise take the
                            lock for this session ("auto: <tool>") and let the edit run. Before a shell tool
                            (Bash, Monitor; the others' in dialects.py): deny a command that names a file
                            another peer holds (shellwrites.py); note the rest
    hook.py PostToolUse     after a shell tool: a file another peer holds that changed anyway is told to the model and
                            reported to the holder and the human (never undone)
    hook.py PostToolUseFailure  the same after a shell command that failed (Claude Code runs no PostToolUse then)
    hook.py Stop            before the model ends its turn: hand it unread messages (and the human's stop
                            or pause), fenced exactly as `check` shows them; remind an idle worker once
    hook.py SessionStart    a short briefing: room, role, who is here, claims, locks, unread count
    hook.py Wait            Stop with asyncRewake: in the background, wait for what concerns the idle session
                            (messages, the human's pause/stop/archive, a task ready for an idle worker) and
                            wake the model with it (exit 2, the same fenced text); CTL_WAKE=never turns it off
    hook.py git-pre-commit  refuse a commit that touches files other peers have locked

`--client codex|gemini` speaks that client's dialect (its tools, its form of a refusal: dialects.py).
Each reads the JSON the client sends on stdin and acts as the session's own peer, found through the
binding its MCP server wrote (see identity.py): no token ever travels in argv or the environment. With
no binding it does nothing. With the broker down it fails open with a visible warning, except for a
path it last saw locked by another peer, which stays closed.
"""
import os
import sys
import time

from ctl import common, dialects, identity, lightjson, paths, user_command
from ctl.common import BrokerClient, BrokerUnavailable, StateError
from ctl.render import flag_note, render_messages, when

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
        """What the hooks remember between runs: locks seen held by others, what the model was told. Only
        this session's: a memo left by an earlier process with the same pid (a crash, a reused pid) is not."""
        try:
            with open(self.memo_path()) as handle:
                memo = lightjson.loads(handle.read())
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) and memo.get("agent_start") == self.binding.get("agent_start") else {}

    def remember(self, memo: dict) -> None:
        identity.write_private(self.memo_path(), {**memo, "agent_start": self.binding.get("agent_start")})


def emit(answer: dict) -> None:
    sys.stdout.write(lightjson.dumps(answer))
    sys.stdout.flush()


def one_line(text: str, limit: int = 80) -> str:
    """Peer text squeezed to one printable line, quoted, for a line the model reads as data."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return lightjson.dumps(flat[:limit] + ("..." if len(flat) > limit else ""), ensure_ascii=False)


# ---------------------------------------------------------------- PreToolUse: locks that hold


def deny(reason: str) -> None:
    emit(DIALECT.deny(reason))


def held_line(path: str, lock: dict) -> str:
    reason = lock.get("reason") or ""
    flagged = flag_note(lock, "reason")
    why = f" for {one_line(reason)}{flagged}{',' if flagged else ''}" if reason else ""
    return (f"{path} is locked by {lock['holder']}{why} since {when(lock['since'])}. Do not edit it: message "
            f"{lock['holder']} (send) to coordinate, or take another task.")


def pre_tool_use(event: dict, peer: Peer) -> None:
    tool = str(event.get("tool_name", ""))
    arguments = event.get("tool_input") if isinstance(event.get("tool_input"), dict) else {}
    root = peer.binding["root"]
    cwd = event.get("cwd") or root
    command = DIALECT.shell_command(tool, arguments)
    if command is not None:
        shell_guard(command, DIALECT.shell_folder(tool, arguments, cwd), tool, event, peer)
        return
    for target in DIALECT.write_targets(tool, arguments):
        path = os.path.realpath(target if os.path.isabs(target) else os.path.join(cwd, target))
        inside = path.startswith(root.rstrip(os.sep) + os.sep)   # a file elsewhere is not ours to guard
        if inside and not guard(path, tool, peer):
            return                                          # answered: one answer per call


def guard(path: str, tool: str, peer: Peer) -> bool:
    """Lock one file of the project for this session. False once an answer is given (a refusal or a warning):
    the client reads one answer per call. Whatever goes wrong (no broker, 503, a bad answer), a path last
    seen locked by another peer stays closed."""
    root = peer.binding["root"]
    memo = peer.memo()
    key = paths.name_key(path, root)
    others = memo.setdefault("held_by_others", {})
    try:
        status, data = peer.call("POST", "/locks", {"path": path, "reason": f"auto: {tool}"[:200]})
    except BrokerUnavailable:
        status, data = None, {"error": {"message": "the broker is not answering"}}
    error = data.get("error", {}) if isinstance(data, dict) else {}
    if status == 409 and isinstance(error.get("lock"), dict):
        others[key] = error["lock"]
        peer.remember(memo)
        deny(held_line(error["lock"]["path"], error["lock"]))
        return False
    if status == 423:
        deny("The human stopped the room: make no more edits. Report where you are and wait for the human.")
        return False
    if status == 200:
        if others.pop(key, None) is not None:
            peer.remember(memo)
        return True
    why = str(error.get("message") or f"the broker answered {status}")
    if key in others:
        deny(held_line(os.path.relpath(path, root), others[key]) + f" (As last seen: {why}.)")
    elif status is None:
        emit({"systemMessage": "Control Tower Lite: the broker is not answering, so this edit is unguarded "
                               f"by locks. Start it: {user_command('launch')}"})
    else:
        emit({"systemMessage": f"Control Tower Lite could not lock {os.path.relpath(path, root)}: {why}"})
    return False


# ---------------------------------------------------------------- shell commands: before and after


SNAPSHOT_FILES = 2048       # locked files whose state one call's snapshot keeps
REPORTED_FILES = 5          # changed files reported per call (the rest are counted)
CHANGES_KEPT = 64           # held files this session changed and may still put back (the oldest are forgotten)


def file_state(path: str):
    """What a write changes about a file, without reading it: size, mtime and ctime (ns), inode; None if absent."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def snapshot_path(peer: Peer, event: dict) -> str:
    """One file per tool call: calls that run in parallel keep their own snapshots. The call is its tool_use_id,
    or where the client sends none (Gemini CLI) its tool and arguments, which its before and after events share."""
    call = event.get("tool_use_id") or lightjson.dumps([event.get("tool_name"), event.get("tool_input")], sort_keys=True)
    call = common.sha256(str(call).encode()).hexdigest()[:16]
    return peer.memo_path()[:-len(".memo.json")] + f".call-{call}.json"


def others_locks(peer: Peer, memo: dict):
    """(key -> lock) of the files other peers of the room hold, and whether it is only as last seen."""
    root, me = peer.binding["root"], peer.binding["name"]
    try:
        status, data = peer.call("GET", "/locks")
    except BrokerUnavailable:
        status, data = None, {}
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("locks"), list):
        return memo.get("held_by_others", {}), True
    held = {paths.name_key(lock["abs_path"], root): lock for lock in data["locks"] if lock.get("holder") != me}
    if held != memo.get("held_by_others", {}):
        memo["held_by_others"] = held
        peer.remember(memo)
    return held, False


def shell_guard(command: str, cwd: str, tool: str, event: dict, peer: Peer) -> None:
    """Deny a command that names a file another peer holds; otherwise note the state of every such file, so
    the call's PostToolUse can tell whether one changed anyway. Never locks: a shell names too many files.
    The one write let through is the undo the report after a call advises: `git checkout -- f` (or `git
    restore f`) of a held file this session changed, while it is still as that call left it."""
    from ctl import shellwrites         # here, not at the top: an edit's hook never pays for compiling it
    root = peer.binding["root"]
    memo = peer.memo()
    held, stale = others_locks(peer, memo)
    if not held:
        return
    writes = shellwrites.write_targets(command, cwd)
    real = lambda t: t if t.glob else shellwrites.Target(os.path.realpath(t.path), t.tree)   # noqa: E731
    resolved, restores = [real(t) for t in writes.targets], {real(t) for t in writes.restores}
    linked = {found[:2] for found in (paths.file_id(t.path) for t in resolved if not t.glob)
              if found and found[2] > 1}
    key = lambda p: paths.name_key(p, root)         # noqa: E731 (the comparison both sides go through)
    mine = memo.get("changed_by_me", {})
    undoing = set()
    for lock_key, lock in held.items():
        same_file = linked and (paths.file_id(lock["abs_path"]) or (0, 0))[:2] in linked
        hits = [t for t in resolved if t.hits(lock_key, key)]
        if hits and not same_file and not writes.unknown and all(t in restores for t in hits) and \
                mine.get(lock_key) == file_state(lock["abs_path"]):
            undoing.add(lock["abs_path"])               # its own change, untouched since: putting it back
        elif same_file or hits:
            deny(held_line(lock["path"], lock) + (" (As last seen: the broker is not answering.)" if stale else ""))
            return
    files = {lock["abs_path"]: {"state": file_state(lock["abs_path"]), "lock": lock,
                                "undo": lock["abs_path"] in undoing}
             for lock in list(held.values())[:SNAPSHOT_FILES]}
    identity.write_private(snapshot_path(peer, event), {"at": time.time(), "tool": tool, "files": files,
                                                        "unknown": writes.unknown})


def post_tool_use(event: dict, peer: Peer) -> None:
    """After a shell call, whether it succeeded or failed (a script may write, then fail): a file another peer
    holds that changed during it is told to the model at once, and reported (the holder and the human see it).
    Nothing is undone: the model or the holder decides."""
    path = snapshot_path(peer, event)
    snapshot = identity.read_private(path)
    identity.remove_quietly(path)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("files"), dict):
        return
    root = peer.binding["root"]
    moved = [(name, entry) for name, entry in snapshot["files"].items() if file_state(name) != entry.get("state")]
    changed = [(name, entry["lock"]) for name, entry in moved if not entry.get("undo")]
    if not moved:
        return
    memo = peer.memo()
    mine = memo.setdefault("changed_by_me", {})
    for name, entry in moved:
        if entry.get("undo"):
            mine.pop(paths.name_key(name, root), None)      # put back: no longer this session's change
    tool = str(event.get("tool_name") or snapshot.get("tool") or "Bash")
    seconds = min(86400, max(0, int(time.time() - float(snapshot.get("at", 0))) + 1))
    lines = []
    for name, lock in changed[:REPORTED_FILES]:
        try:
            status, answer = peer.call("POST", "/locks/violation", {"path": name, "tool": tool[:32],
                                                                   "seconds": seconds})
        except BrokerUnavailable:
            status, answer = None, {}
        if status == 200 and answer.get("holder_active"):
            continue                                # its holder was editing it meanwhile: likely its own change
        mine[paths.name_key(name, root)] = file_state(name)     # this session may put it back
        while len(mine) > CHANGES_KEPT:
            mine.pop(next(iter(mine)))
        told = "they and the human have been told" if status == 200 else "the broker could not be told"
        lines.append(f"{lock['path']} is locked by {lock['holder']} (since {when(lock['since'])}) and changed "
                     f"during your {tool} call ({told}). If your command changed it, restore it (for example "
                     f"git checkout -- {lock['path']}, if it held no uncommitted work of theirs) or message "
                     f"{lock['holder']} (send) to agree on it; do not change it again. A note that it changed on disk "
                     f"and is to be taken as it now is does not cover this change.")
    if len(changed) > REPORTED_FILES:
        lines.append(f"{len(changed) - REPORTED_FILES} more locked file(s) changed too.")
    peer.remember(memo)
    if lines:
        answered = "PostToolUseFailure" if event.get("hook_event_name") == "PostToolUseFailure" else "PostToolUse"
        emit({"hookSpecificOutput": {"hookEventName": answered,
                                     "additionalContext": "Control Tower Lite: " + "\n".join(lines)}})


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


BRIEFING_NEXT = {"architect": "Next: plan the work with create_task (depends_on orders it); record decisions with "
                              "set_memory; check for blockers.",
                 "worker": "Next: claim_task, do it, complete_task with a summary; check between tasks."}


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
    room = peer.client.headers.get("x-ctl-room", "running")
    lines = [f"Control Tower Lite: you are {name} ({me['role']}) in room {peer.binding['room']}.",
             *([ROOM_NOTICE[room]] if room in ROOM_NOTICE else []),
             f"Here: {', '.join(others) or 'nobody else yet'}.",
             f"Your claims: {', '.join(mine) or 'none'}; your locks: {len(my_locks)}; "
             f"ready tasks: {ready.get('counts', {}).get('ready', 0)}; unread messages: {unread}.",
             "Edits to files another peer has locked are refused; your own edits lock their files for you.",
             BRIEFING_NEXT.get(me["role"], BRIEFING_NEXT["worker"])]
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
    held = {paths.name_key(lock["abs_path"], root): lock for lock in locks.get("locks", []) if lock["holder"] != me}
    clashes = [held[key] for key in (paths.name_key(path, root) for path in staged_files(root)) if key in held]
    if not clashes:
        return 0
    print("ctl git guard: this commit touches files other peers have locked:", file=sys.stderr)
    for lock in clashes:
        print(f"  {lock['path']} (locked by {lock['holder']} since {when(lock['since'])})", file=sys.stderr)
    print("Coordinate with them, or unstage those files. A human can bypass the guard: CTL_GIT_GUARD=0 git commit",
          file=sys.stderr)
    return 1


# ---------------------------------------------------------------- Wait: waking an idle session


WAKE_SETTING = "CTL_WAKE"       # "never" in the session's environment: no waiter, the session is not woken
WAIT_LIFETIME = 86000           # seconds; hooks.json gives the CLI's hard limit (86400) a little room
POLL_SECONDS = 50               # one long poll (the broker allows 60); the loop simply asks again
RETRY_SECONDS = 5               # the broker is down or restarting: ask again this much later
ROOM_STATES = ("running", "paused", "stopped")
WAKE_NOTICE = {**ROOM_NOTICE,
               "running": "RESUMED: the human resumed the room; carry on with your work.",
               "archived": "ARCHIVED: the human archived this room; the team is done. Stop here."}


class Handover:
    """A per-session file lock: whoever holds it reads, hands over and acknowledges messages alone (the
    Stop hook or the waiter), so nothing is handed over twice. The file names the one waiter that may
    still wake the session: the newest one, since every turn end starts another."""

    def __init__(self, peer: Peer):
        self.path = peer.memo_path()[:-len(".memo.json")] + ".wait"

    def __enter__(self):
        import fcntl
        self.handle = open(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.handle.close()                 # closing releases the lock

    def waiter(self) -> str:
        self.handle.seek(0)
        return self.handle.read().strip()

    def name_waiter(self, token: str) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(token)
        self.handle.flush()


def handing_over(handler):
    """The Stop hook's hand-over, made exclusive with the waiter's (see Handover)."""
    def run(event: dict, peer: Peer):
        with Handover(peer):
            return handler(event, peer)
    return run


def runs_in_background(agent_pid: int) -> bool:
    """Whether the CLI backgrounds an asyncRewake hook: not in -p mode, unless it reads stream-json on stdin.
    A waiter it does not background would hold every turn end of a -p run until its timeout."""
    try:
        with open(f"/proc/{agent_pid}/cmdline", "rb") as handle:
            args = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    printing = "-p" in args or "--print" in args
    streaming = "--input-format=stream-json" in args or any(
        a == "--input-format" and b == "stream-json" for a, b in zip(args, args[1:]))
    return not printing or streaming


def retire(previous: str, binding: dict) -> None:
    """Ask the waiter this one replaces to go now (it would also find itself replaced when it next looks):
    only a process of this same session's hooks, so a reused pid is never signalled."""
    import signal
    try:
        pid = int(previous.split("-")[0])
    except ValueError:
        return
    if pid == os.getpid() or (binding["agent_pid"], binding["agent_start"]) not in identity.ancestors(pid):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"\0Wait" not in handle.read():
                return
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass


def end_with_session(agent_pid: int) -> None:
    """The waiter ends when its Claude Code process does (a background thread watches it)."""
    import select
    import threading

    def watch():
        try:
            fd = os.pidfd_open(agent_pid)
        except (AttributeError, OSError):
            fd = None
        while True:
            if fd is not None:
                select.select([fd], [], [])
            else:
                time.sleep(RETRY_SECONDS)
            if fd is not None or identity.process_start(agent_pid) is None:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def wake_text(batch: dict, memo: dict, known_ready: int):
    """What the idle model must hear now, or None: the room's new state, messages, newly ready tasks."""
    parts = []
    room, told = batch["room"], memo["told_room"]
    if room != told and room in WAKE_NOTICE and (room != "running" or told in ROOM_NOTICE):
        parts.append(WAKE_NOTICE[room])
    if batch["messages"]:
        parts.append(f"While you were idle, {len(batch['messages'])} message(s) arrived from your team "
                     "(now marked read):\n" + render_messages(batch["messages"]))
    if batch.get("ready", 0) > known_ready:
        parts.append(f"{batch['ready']} task(s) are ready and you hold none: call claim_task to take the next one "
                     "(or tell the human why not).")
    return "\n\n".join(parts) or None


def wake(text: str) -> int:
    """Exit code 2 with the text on stderr: Claude Code wakes the model with it."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    return 2


def look(peer: Peer, known_ready):
    """Under the Handover lock: wake now (an exit code), or what to wait for (the long poll's query string
    and the ready count it knows), or (None, None, known_ready) to ask again later."""
    memo = peer.memo()
    status, batch = peer.call("GET", "/inbox?limit=20&ready=0")
    if status == 401:
        if batch.get("error", {}).get("code") != "room_archived" or memo.get("told_room") == "archived":
            return 0, None, known_ready
        memo["told_room"] = "archived"
        peer.remember(memo)
        return wake(WAKE_NOTICE["archived"]), None, known_ready
    if status != 200:
        return None, None, known_ready
    if batch.get("wake") == "never":
        return 0, None, known_ready                         # the human turned waking off for this room
    if known_ready is None:                                 # the first look: what is known now is no news
        known_ready = batch["ready"]
        if "told_room" not in memo:
            memo["told_room"] = batch["room"]
            peer.remember(memo)
    text = wake_text(batch, memo, known_ready)
    if text:
        memo["told_room"] = batch["room"]
        peer.remember(memo)
        code = wake(text)
        if batch["messages"]:                               # handed over: only now are they read
            peer.call("POST", "/inbox/ack", {"ids": [m["delivery_id"] for m in batch["messages"]]})
        return code, None, known_ready
    told = memo.get("told_room") if memo.get("told_room") in ROOM_STATES else batch["room"]
    return None, f"/inbox?limit=20&wait={POLL_SECONDS}&state={told}&ready={known_ready}", known_ready


def wait(event: dict, peer: Peer) -> int:
    """Stop, run with asyncRewake: wait in the background for what concerns this session, and wake it.

    What is unread when the turn ends is handed over by whichever of the Stop hook and this waiter
    takes the Handover lock first, so each message reaches the model once. Decisions are made under the
    lock from a fresh read; the long poll in between only says when to look again, and costs nothing."""
    import secrets
    import signal
    binding = peer.binding
    if os.environ.get(WAKE_SETTING, "").strip().lower() == "never" or not runs_in_background(binding["agent_pid"]):
        return 0
    me = f"{os.getpid()}-{secrets.token_hex(4)}"
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))   # replaced, or the session ends: quietly
    with Handover(peer) as slot:
        retire(slot.waiter(), binding)
        slot.name_waiter(me)
    end_with_session(binding["agent_pid"])
    deadline = time.monotonic() + WAIT_LIFETIME
    known_ready = None
    while time.monotonic() < deadline:
        fresh = identity.find_binding(peer.state_dir)
        if fresh is None:
            return 0                                        # the session's MCP server is gone
        peer.binding, peer.client.token = fresh, fresh["token"]     # tokens are renewed as they age
        code = watch = None
        try:
            with Handover(peer) as slot:
                if slot.waiter() != me:
                    return 0                                # a newer waiter took over: it wakes the session
                code, watch, known_ready = look(peer, known_ready)
            if code is not None:
                return code
            if watch is not None:
                status, _ = peer.client.request("GET", watch, timeout=POLL_SECONDS + 10)
                if status in (200, 401):
                    continue
        except BrokerUnavailable:
            pass
        time.sleep(RETRY_SECONDS)                           # never a busy loop, whatever the broker says
    return 0


# ---------------------------------------------------------------- entry point

EVENTS = {"PreToolUse": pre_tool_use, "PostToolUse": post_tool_use, "PostToolUseFailure": post_tool_use,
          "Stop": handing_over(stop), "SessionStart": session_start, "Wait": wait}


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
    """hook.py [--port N] [--state-dir DIR] [--client NAME] EVENT, its event on stdin."""
    argv = sys.argv[1:] if argv is None else argv
    global DIALECT
    options, argv = common.leading_options(argv, ("--port", "--state-dir", "--client"))
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
            event = lightjson.loads(sys.stdin.read() or "{}")
        except ValueError:
            return 0
        peer = find_peer(state_dir, BINDING_WAIT if argv[0] == "SessionStart" else 0)
        if peer is None or not isinstance(event, dict):
            return 0                                        # not a coordinated session: nothing to do
        try:
            code = EVENTS[argv[0]](event, peer)
        finally:
            peer.client.close()
    except Exception as exc:                # a hook never breaks the session: it fails open, visibly
        if argv[0] == "PreToolUse":
            emit({"systemMessage": f"Control Tower Lite hook could not check locks ({exc}); edit unguarded."})
        elif not isinstance(exc, (BrokerUnavailable, StateError, OSError)):
            print(f"ctl hook: {exc!r}", file=sys.stderr)
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
