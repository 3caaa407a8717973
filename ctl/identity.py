"""Which project and which session a process belongs to, without ever putting a token in argv or env.

- A session's project is the top of the git work tree holding its working directory (found by walking up
  to a `.git` entry, so a worktree, whose `.git` is a file, is a project of its own), else the directory.
- The MCP server writes a binding, a 0600 file in the state directory keyed by its parent process (the
  Claude Code session) and that process's start time. A hook, started by the same Claude Code, walks its
  own ancestors to find it. A stale binding (the pid reused by another process) never matches.
- The watcher's narrow credential (read and acknowledge one inbox) is a 0600 ticket per room and name.
"""
import _socket
import os
import stat

from ctl import lightjson
from ctl.common import StateError, check_private_file, refuse_unsafe, sha256

NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
RUN = object()          # a run of characters a name may not hold, in default_name


def project_root(cwd: str) -> str:
    folder = os.path.realpath(cwd)
    probe = folder
    while True:
        if os.path.lexists(os.path.join(probe, ".git")):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return folder
        probe = parent


def default_name(cwd: str) -> str:
    """The folder's name, made a valid peer name (the broker may still call it reserved: then `-2`): each run
    of other characters becomes one `-` (without re, which the MCP server's start would pay for)."""
    kept = []
    for char in os.path.basename(cwd.rstrip("/")) or "peer":
        if char in NAME_CHARACTERS:
            kept.append(char)
        elif not kept or kept[-1] is not RUN:
            kept.append(RUN)
    name = "".join("-" if c is RUN else c for c in kept).lstrip("._-")[:32]
    return name or "peer"


def process_start(pid: int):
    """(parent pid, start time in clock ticks) from /proc, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()       # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def agent_id() -> str:
    """The same for every join of one agent process (this server's parent), different across agents and boots:
    the broker keeps a kicked agent out under any name it picks. Same-user processes can forge it (SECURITY.md)."""
    parent = os.getppid()
    info = process_start(parent)
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    return sha256(f"{parent}:{info[1] if info else ''}:{boot}".encode()).hexdigest()[:32]


def ancestors(pid: int, depth: int = 12):
    """(pid, start time) of the process and its parents, nearest first."""
    while pid > 1 and depth > 0:
        info = process_start(pid)
        if info is None:
            return
        yield pid, info[1]
        pid, depth = info[0], depth - 1


def private_dirs(folder: str) -> None:
    """Create `folder` and every missing parent 0700 (os.makedirs gives the mode to the last one only), then
    refuse it, or its parent, if a link, another owner or loose permissions make it unsafe: a `sessions/`
    replaced by a link elsewhere must not receive the session's token."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o700)
        except FileExistsError:
            pass
    target = missing[0] if missing else folder
    for each in (target, os.path.dirname(target)):
        refuse_unsafe(each, os.lstat(each), stat.S_ISDIR, "directory", "700")


def write_private(path: str, data: dict) -> None:
    private_dirs(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(lightjson.dumps(data))
    os.replace(tmp, path)


def read_private(path: str):
    try:
        if not check_private_file(path):
            return None
        with open(path) as handle:
            return lightjson.loads(handle.read())
    except (OSError, ValueError, StateError):
        return None


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def binding_path(state_dir: str, pid: int) -> str:
    return os.path.join(state_dir, "sessions", f"{pid}.json")


def write_binding(state_dir: str, data: dict) -> str:
    """Bind this MCP server's session to its parent (the agent process); returns the file's path."""
    parent = os.getppid()
    info = process_start(parent)
    path = binding_path(state_dir, parent)
    write_private(path, {**data, "agent_pid": parent, "agent_start": info[1] if info else None,
                          "server_pid": os.getpid()})
    return path


def join_socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "sessions", f"{os.getppid()}.sock")


def listen_private(path: str):
    """A Unix socket only this user can reach (0600, in a 0700 folder), or None where there are none. A raw
    _socket (no socket module to import at the server's start): socket.socket(fileno=it.detach()) to accept."""
    private_dirs(os.path.dirname(path))     # every folder it makes 0700: the state directory may not exist yet
    remove_quietly(path)
    try:
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_mask)
        listener.listen(8)
        return listener
    except (OSError, AttributeError):
        return None


def ask_to_join(binding: dict, timeout: float = 9.0) -> str:
    """Ask the session's MCP server to join now (it may have to start the broker): its one-line answer."""
    import socket                           # here: a hook asks once, at the session's first call
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(binding["join_socket"])
            sock.sendall(b"join\n")
            return sock.makefile("rb").readline().decode(errors="replace").strip()
    except (OSError, KeyError, TypeError):
        return "failed: the session's MCP server did not answer"


def find_binding(state_dir: str, pid: int = None):
    """The session binding of the nearest ancestor that has one, checked against its start time."""
    for ancestor, started in ancestors(pid or os.getpid()):
        data = read_private(binding_path(state_dir, ancestor))
        if data is not None and data.get("agent_start") == started:
            return data
    return None


def ticket_path(state_dir: str, room: str, name: str) -> str:
    return os.path.join(state_dir, "watch", room, f"{name}.json")


def write_ticket(state_dir: str, room: str, name: str, token: str) -> None:
    write_private(ticket_path(state_dir, room, name), {"room": room, "name": name, "token": token})


def read_ticket(state_dir: str, room: str, name: str):
    return read_private(ticket_path(state_dir, room, name))


def list_tickets(state_dir: str) -> list:
    """`room/name` of every watch ticket on this machine."""
    folder = os.path.join(state_dir, "watch")
    found = []
    for room in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if os.path.isdir(os.path.join(folder, room)):
            found += [f"{room}/{f[:-5]}" for f in sorted(os.listdir(os.path.join(folder, room))) if f.endswith(".json")]
    return found
