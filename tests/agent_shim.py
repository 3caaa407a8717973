"""A stand-in for the Claude Code process in tests: it starts the MCP server as its child, sharing its
stdio, and runs hook commands as its children on request (over a unix socket), so a hook finds its
session the way it does under Claude Code: by walking its own parent processes.

    python3 agent_shim.py SOCKET COMMAND...
"""
import json
import os
import socket
import subprocess
import sys
import threading


def read_line(sock: socket.socket) -> bytes:
    """One newline-ended message from the socket (both ends of the shim's protocol use it)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def run_hook(conn: socket.socket) -> None:
    with conn:
        request = json.loads(read_line(conn))
        done = subprocess.run(request["argv"], input=request["stdin"].encode(), capture_output=True,
                              env={**os.environ, **request.get("env", {})}, cwd=request.get("cwd"), timeout=60)
        conn.sendall(json.dumps({"code": done.returncode, "stdout": done.stdout.decode(errors="replace"),
                                 "stderr": done.stderr.decode(errors="replace")}).encode() + b"\n")


def serve(listener: socket.socket) -> None:
    """Hooks run side by side, as Claude Code runs them (a background waiter beside the next Stop)."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run_hook, args=(conn,), daemon=True).start()


def main() -> int:
    path, command = sys.argv[1], sys.argv[2:]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    return subprocess.Popen(command).wait()


if __name__ == "__main__":
    sys.exit(main())
