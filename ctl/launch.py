#!/usr/bin/env python3
"""Start the Control Tower Lite broker in the background and open the dashboard.

    python3 launch.py               start the broker if needed, print and open the dashboard URL
    python3 launch.py --no-browser  same, without opening a browser
    python3 launch.py --status      the room at a glance
    python3 launch.py --observer    print a read-only dashboard URL
    python3 launch.py --stop        stop the broker this state directory runs
    python3 launch.py --foreground  run the broker attached, for debugging

The dashboard URL carries the operator token in its fragment (after '#'), which browsers never
send to a server, so it reaches no log.
"""
import argparse
import os
import signal
import sys
import time
import webbrowser

from ctl import common, entry_command, user_command
from ctl.common import BrokerClient, BrokerUnavailable, StateError, broker_running



def recorded_pid(state_dir: str):
    """The pid the broker wrote beside its lock, if that process is still a broker."""
    try:
        with open(os.path.join(state_dir, "broker.pid")) as handle:
            pid = int(handle.read().split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"broker" in cmdline else None


def start(port: int, state_dir: str) -> None:
    if broker_running(port, state_dir):
        print(f"Broker already running on port {port}.")
        return
    common.spawn_broker(port, state_dir)
    print(f"Broker started on port {port} (pid {recorded_pid(state_dir)}, log {os.path.join(state_dir, 'broker.log')}).")


def dashboard_url(port: int, token: str) -> str:
    return f"http://{common.HOST}:{port}/#token={token}"


def stop(port: int, state_dir: str) -> int:
    pid = recorded_pid(state_dir)
    if pid is None:
        print("No broker is running for this state directory.")
        return 0
    if not broker_running(port, state_dir):
        print(f"Process {pid} holds the state directory but does not answer as our broker on port {port}; "
              "check --port, or stop it by hand.", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while time.time() < deadline and recorded_pid(state_dir) == pid and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    print(f"Broker (pid {pid}) stopped.")
    return 0


def status(port: int, state_dir: str) -> int:
    if not broker_running(port, state_dir):
        print(f"No broker answers on port {port}; start it with: {user_command('launch')}")
        return 1
    client = operator_client(port, state_dir)
    try:
        rooms = client_ok(client, "GET", "/rooms")["rooms"]
        open_rooms = [r for r in rooms if not r["archived"]]
        print(f"Broker on port {port}: {len(open_rooms)} open room(s), {len(rooms) - len(open_rooms)} archived.")
        for summary in open_rooms:
            room = client_ok(client, "GET", f"/state?room={summary['id']}")
            show_room(room)
    finally:
        client.close()
    return 0


def show_room(room: dict) -> None:
    """One room in the terminal; every peer-set text escaped, so it cannot move the cursor or forge a line."""
    counts, info = room["tasks"]["counts"], room["room"]
    print(f"\nRoom {printable(info['name'])} ({printable(info['root'] or 'no project root')}): {info['state']}; "
          f"architect: {printable(info['architect'] or 'none')}")
    print(f"  Tasks: {counts['ready']} ready, {counts['claimed']} claimed, {counts['blocked']} blocked, "
          f"{counts['done']} done")
    for peer in room["peers"]:
        claims = f", holds {', '.join(f'#{c}' for c in peer['claims'])}" if peer["claims"] else ""
        print(f"  {printable(peer['name'])} ({peer['role']}, {peer['state']}){claims}, {peer['unread']} unread")
    for lock in room["locks"]:
        print(f"  lock {printable(lock['path'])} by {printable(lock['holder'])}")
    print(f"  Unread blockers: {room['open_blockers']}")


def printable(text: str) -> str:
    """Control characters (a \\r that rewrites the line, an escape sequence) shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def operator_client(port: int, state_dir: str) -> BrokerClient:
    key = common.read_secret(state_dir, common.HMAC_KEY_FILE)
    return BrokerClient(port, token=common.read_secret(state_dir, common.OPERATOR_TOKEN_FILE), verify_key=key)


def client_ok(client: BrokerClient, method: str, path: str, body=None) -> dict:
    status, data = client.request(method, path, body)
    if status != 200:
        raise StateError(f"the broker refused {method} {path}: {data.get('error', {}).get('message', status)}")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start Control Tower Lite and open its dashboard.")
    common.add_location_args(parser)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="print the room at a glance")
    action.add_argument("--stop", action="store_true", help="stop the broker")
    action.add_argument("--foreground", action="store_true", help="run the broker attached to this terminal")
    action.add_argument("--observer", action="store_true", help="print a read-only dashboard URL")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    args = parser.parse_args(argv)
    try:
        port = common.resolve_port(args.port)
        state_dir = common.resolve_state_dir(args.state_dir)
        if args.foreground:
            command = entry_command("broker")
            os.execv(command[0], command + ["--port", str(port), "--state-dir", state_dir])
        if args.status:
            return status(port, state_dir)
        if args.stop:
            return stop(port, state_dir)
        start(port, state_dir)
        if args.observer:
            key = common.read_secret(state_dir, common.HMAC_KEY_FILE)
            print(f"Read-only dashboard: {dashboard_url(port, common.TokenSigner(key).observer_token())}")
            return 0
        url = dashboard_url(port, common.read_secret(state_dir, common.OPERATOR_TOKEN_FILE))
    except (StateError, BrokerUnavailable, OSError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    print(f"Dashboard (operator; keep this URL private): {url}")
    if not args.no_browser and not webbrowser.open(url):
        print("Could not open a browser; paste the URL into one.")
    print("Next: open Claude Code in each project; tell one session to join as the architect.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
