"""What every Control Tower Lite program shares: where the broker lives, its secrets, and a client.

Kept small and free of heavy imports: every hook process imports it, and starts on every edit. So the
socket is _socket (the socket module's enums cost 8 ms), JSON is ctl.lightjson, and the HMAC the client
checks the broker with is computed over the builtin SHA-256 (hashlib loads OpenSSL, 4 ms); the broker's
token minting, which needs none of this haste, is in ctl.tokens.
"""
import _socket
import os
import stat
import sys
import time

from ctl import entry_command, lightjson, user_command

# CPython's builtin SHA-256, without hashlib's OpenSSL (4 ms a hook), under the running version's own name:
# 3.12 renamed _sha256 to _sha2 (test_stdlib holds it to that version's standard library).
try:
    sha256 = __import__("_sha2" if sys.version_info >= (3, 12) else "_sha256").sha256
except ImportError:                             # a Python without it
    from hashlib import sha256
try:
    from _operator import _compare_digest as compare_digest     # what hmac.compare_digest falls back to
except ImportError:
    from hmac import compare_digest

DEFAULT_PORT = 7878
DEFAULT_STATE_DIR = "~/.control-tower"
HOST = "127.0.0.1"

HMAC_KEY_FILE = "hmac.key"
JOIN_SECRET_FILE = "join.secret"
OPERATOR_TOKEN_FILE = "operator.token"
OBSERVER_TOKEN_FILE = "observer.token"
CHALLENGE_PREFIX = b"ctl-challenge:"


class StateError(Exception):
    """The state directory or one of its files is unsafe or unreadable; the message says how to fix it."""


def add_location_args(parser) -> None:
    parser.add_argument("--port", type=int, default=None,
                        help=f"broker port (env CTL_PORT, default {DEFAULT_PORT})")
    parser.add_argument("--state-dir", default=None,
                        help=f"state directory (env CTL_STATE_DIR, default {DEFAULT_STATE_DIR})")


def leading_options(argv: list, names: tuple) -> tuple:
    """(options, the rest): `--name value` pairs of these names at the front of argv, each once. Parsed by
    hand where a process starts often (a hook, the MCP server): argparse alone costs it milliseconds."""
    options = {}
    while len(argv) >= 2 and argv[0] in names and argv[0] not in options:
        options[argv[0]], argv = argv[1], argv[2:]
    return options, argv


def resolve_port(port_arg=None) -> int:
    raw = port_arg if port_arg is not None else os.environ.get("CTL_PORT", DEFAULT_PORT)
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise StateError(f"port must be a number, got {raw!r} (check --port or CTL_PORT)")
    if not 1 <= port <= 65535:
        raise StateError(f"port must be between 1 and 65535, got {port}")
    return port


def resolve_state_dir(state_arg=None) -> str:
    raw = state_arg or os.environ.get("CTL_STATE_DIR") or DEFAULT_STATE_DIR
    return os.path.abspath(os.path.expanduser(raw))


def refuse_unsafe(path: str, st: os.stat_result, is_kind, kind: str, mode: str) -> None:
    """A link, the wrong kind, another owner or loose permissions: refuse, saying how to fix it."""
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path} is a symlink; replace it with a real {kind}")
    if not is_kind(st.st_mode):
        raise StateError(f"{path} is not a {kind}; remove it")
    if st.st_uid != os.getuid():
        raise StateError(f"{path} belongs to another user; remove it")
    if st.st_mode & 0o077:
        raise StateError(f"{path} is accessible to other users; run: chmod {mode} {path}")


def ensure_state_dir(path: str, create: bool = True) -> str:
    """Create the directory 0700, or refuse one that a link, another user or loose permissions make unsafe."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise StateError(f"state directory {path} does not exist; start the broker first ({user_command('launch')})")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    refuse_unsafe(path, st, stat.S_ISDIR, "directory", "700")
    return path


def check_private_file(path: str) -> bool:
    """True if the file exists and is safe to use; False if absent; StateError if unsafe."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    refuse_unsafe(path, st, stat.S_ISREG, "file", "600")
    return True


def _fresh_secret_file(path: str) -> str:
    """A new random secret in a 0600 temporary file beside `path`, fsynced; returns the temporary path."""
    import secrets                      # only the broker and launch.py make secrets
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_urlsafe(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_secret(state_dir: str, name: str) -> None:
    """A new random secret, replacing any old one in one rename."""
    path = os.path.join(state_dir, name)
    os.replace(_fresh_secret_file(path), path)


def read_secret(state_dir: str, name: str, create: bool = False) -> str:
    """Read a secret file, creating it once (atomically, 0600) when asked; secrets are reused forever after."""
    path = os.path.join(state_dir, name)
    if not check_private_file(path):
        if not create:
            raise StateError(f"{path} is missing; start the broker first ({user_command('launch')})")
        tmp = _fresh_secret_file(path)
        try:
            os.link(tmp, path)                  # the first writer wins a race; the others read its secret
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        check_private_file(path)
    with open(path, "r", encoding="ascii") as handle:
        value = handle.read().strip()
    if len(value) < 32:
        raise StateError(f"{path} is too short to be a secret; delete it and restart the broker")
    return value


def challenge_proof(key: str, nonce: str, port: int) -> str:
    """What only the holder of the state directory's HMAC key can answer for a nonce, bound to the address
    the client dialled: a relay on another port gets a proof its client will not accept."""
    bound = f"{HOST}:{port}|{nonce}".encode()
    return hmac_sha256(key.encode(), CHALLENGE_PREFIX + bound).hex()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 as RFC 2104 defines it (tests check it against the hmac module), without loading OpenSSL."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


class BrokerUnavailable(Exception):
    """Nothing answers on the broker port, or what answers is not our broker."""


class _Wire:
    """One keep-alive HTTP/1.1 connection: just enough HTTP for the broker's own JSON answers (always
    Content-Length, never chunked). Written here because http.client imports the email package, which
    costs every hook process and MCP server start about 30 ms."""

    MAX_ANSWER = 8 << 20

    def __init__(self, port: int, timeout: float):
        self.sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect((HOST, port))
            self.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError:
            self.sock.close()
            raise
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed mid-answer")
        self.buffer += chunk
        if len(self.buffer) > self.MAX_ANSWER:
            raise ConnectionError("the answer is too large")

    def exchange(self, method: str, path: str, headers: dict, payload):
        """Send one request; return (status, {lower-case header: value}, body bytes)."""
        head = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        if payload is not None:
            head.append(f"Content-Length: {len(payload)}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (payload or b""))
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        block, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = block.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError("the answer is not HTTP")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = fields.get("content-length", "0")
        if not length.isdigit():
            raise ConnectionError("the answer has no usable Content-Length")
        while len(self.buffer) < int(length):
            self._fill()
        body, self.buffer = self.buffer[:int(length)], self.buffer[int(length):]
        return int(parts[1]), fields, body


class BrokerClient:
    """A keep-alive JSON client for the broker; one per thread (a connection is not shared).

    With `verify_key`, every new connection first proves the peer holds that HMAC key, so a process
    squatting on the port never sees a token.
    """

    def __init__(self, port: int, token: str = None, timeout: float = 10.0, verify_key: str = None):
        self.port = port
        self.token = token
        self.timeout = timeout
        self.verify_key = verify_key
        self.headers = {}
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, method: str, path: str, payload, headers: dict):
        status, self.headers, raw = self._conn.exchange(method, path, headers, payload)
        if self.headers.get("connection", "").lower() == "close":
            self.close()
        try:
            data = lightjson.loads(raw) if raw else {}
        except ValueError:
            data = {"error": {"code": "bad_response", "message": raw[:200].decode(errors="replace")}}
        return status, data

    def _connect(self, timeout: float) -> None:
        self._conn = _Wire(self.port, timeout)
        if self.verify_key is None:
            return
        nonce = os.urandom(16).hex()
        status, data = self._exchange("GET", f"/health?challenge={nonce}", None, {"Host": f"{HOST}:{self.port}"})
        proof = str(data.get("proof", "")) if isinstance(data, dict) else ""
        if status != 200 or not compare_digest(proof.encode(), challenge_proof(self.verify_key, nonce, self.port).encode()):
            self.close()
            raise BrokerUnavailable(f"the process on port {self.port} is not our Control Tower broker")

    def request(self, method: str, path: str, body=None, token: str = None, timeout: float = None):
        """Return (status, decoded JSON); retry once on a dropped keep-alive connection."""
        payload = None if body is None else lightjson.dumps(body).encode()
        headers = {"Host": f"{HOST}:{self.port}"}
        bearer = token or self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if payload is not None:
            headers["Content-Type"] = "application/json"
        wait = timeout or self.timeout
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self._connect(wait)
                self._conn.sock.settimeout(wait)
                return self._exchange(method, path, payload, headers)
            except OSError as exc:                  # ConnectionError and TimeoutError are OSErrors too
                self.close()
                if attempt == 2 or isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                    raise BrokerUnavailable(f"broker on port {self.port} is unreachable: {exc}") from exc
        raise AssertionError("unreachable")


def verify_broker(port: int, state_dir: str, timeout: float = 2.0) -> None:
    """Make sure the process on the port holds our HMAC key before any secret is sent to it."""
    client = BrokerClient(port, timeout=timeout, verify_key=read_secret(state_dir, HMAC_KEY_FILE))
    try:
        client.request("GET", "/health")
    finally:
        client.close()


def broker_running(port: int, state_dir: str) -> bool:
    try:
        verify_broker(port, state_dir)
        return True
    except (BrokerUnavailable, StateError):
        return False


def spawn_broker(port: int, state_dir: str, wait: float = 10.0) -> None:
    """Start a detached broker (log in the state directory) and wait until a broker proves itself there:
    ours, or one another session started at the same moment (the loser of that race exits at once)."""
    import subprocess                   # here, not at the top: hooks and MCP servers start faster without it
    ensure_state_dir(state_dir)
    log_path = os.path.join(state_dir, "broker.log")
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        started_at = log.tell()
        proc = subprocess.Popen(entry_command("broker") + ["--port", str(port), "--state-dir", state_dir],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + wait
    while time.time() < deadline:
        if broker_running(port, state_dir):
            return
        if proc.poll() is not None:
            with open(log_path, "rb") as handle:
                handle.seek(started_at)
                said = handle.read().decode(errors="replace").strip()    # this attempt's words only
            raise StateError(f"the broker exited at once:\n{said}")
        time.sleep(0.1)
    raise StateError(f"the broker did not become healthy within {wait:.0f}s; see {log_path}")
