#!/usr/bin/env python3
"""Start the Control Tower Lite broker in the background and open the dashboard.

    python3 launch.py               start the broker if needed and open the dashboard
    python3 launch.py --no-browser  same, printing a one-time dashboard link instead of opening a browser
    python3 launch.py --status      the room at a glance
    python3 launch.py --observer    print a one-time read-only dashboard link
    python3 launch.py --stop        stop the broker this state directory runs
    python3 launch.py --foreground  run the broker attached, for debugging
    python3 launch.py --help        every operation: --archive-room, --backup, --restore, --export, --doctor, ...

No token is ever put in a URL, since browsers keep every URL they visit: a dashboard link carries a one-time
code that the page trades for its token once (ctl/dashboard.py), and that is worthless once used or expired.
"""
import argparse
import os
import shlex
import signal
import sys
import time
import webbrowser

from ctl import common, entry_command, operations, quiet_pipe, user_command
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


def dashboard_link(port: int, state_dir: str, token_file: str, via: str = "link") -> dict:
    """A one-time link from the broker, for the access the token file gives; via "file", the broker also
    writes the 0600 handoff file a browser can be pointed at."""
    key = common.read_secret(state_dir, common.HMAC_KEY_FILE)
    client = BrokerClient(port, token=common.read_secret(state_dir, token_file), verify_key=key)
    try:
        return client_ok(client, "POST", "/link", {"via": via})
    finally:
        client.close()


def print_link(port: int, state_dir: str, token_file: str, what: str) -> None:
    link = dashboard_link(port, state_dir, token_file)
    print(f"{what}: {link['url']}\n  (a one-time link: it works once, within {link['expires_in'] // 60} minutes; "
          "this command prints a fresh one)")


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
    answer = operations.what_answers(port, state_dir)
    if answer != "ours":
        print(f"No Control Tower broker answers on port {port}: {answer} does"
              + (f". Start one with: {user_command('launch')}" if answer == "nothing" else
                 "; stop it or choose another port (CTL_PORT, --port)."))
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
    print(f"\nRoom {printable(info['name'])} ({printable(info['root'] or 'no project root')}): "
          f"{printable(info['state'])}; {printable(info['seat_text'])}")
    print(f"  Tasks: {counts['ready']} ready, {counts['claimed']} claimed, {counts['blocked']} blocked, "
          f"{counts['done']} done")
    for peer in room["peers"]:
        claims = f", holds {', '.join(f'#{c}' for c in peer['claims'])}" if peer["claims"] else ""
        print(f"  {printable(peer['name'])} ({printable(peer['role'])}, {printable(peer['state'])}){claims}, "
              f"{peer['unread']} unread")
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


def open_dashboard(port: int, state_dir: str) -> bool:
    """Point the browser at the broker's 0600 handoff file, so even the one-time code is in no command line
    that another local user could read in /proc and use first."""
    return webbrowser.open(f"file://{dashboard_link(port, state_dir, common.OPERATOR_TOKEN_FILE, 'file')['file']}")


def registered_anywhere() -> list:
    from ctl import install
    return install.registrations()


def launch(port: int, state_dir: str, args) -> int:
    start(port, state_dir)
    if not args.no_browser and open_dashboard(port, state_dir):
        print(f"Dashboard opened in your browser. Another browser: {user_command('launch')} --no-browser "
              "prints a one-time link.")
    else:
        print_link(port, state_dir, common.OPERATOR_TOKEN_FILE, "Dashboard (operator; keep the link private)")
    found = registered_anywhere()
    if not found:
        where = [] if port == common.DEFAULT_PORT else ["--port", str(port)]
        if state_dir != common.resolve_state_dir(common.DEFAULT_STATE_DIR):
            where += ["--state-dir", state_dir]
        print("\n!! No agent will talk to this broker yet: the MCP server is not registered with Claude Code."
              f"\n!! Register it once:  {' '.join([user_command('install'), '--hooks', *map(shlex.quote, where)])}"
              + ("\n!! (the plugin cannot: it always uses port 7878 and ~/.control-tower)" if where else
                 "\n!! (or install the plugin: claude plugin marketplace add <this checkout>; "
                 "claude plugin install ctl@control-tower-lite)"))
        return 0
    print(f"Registered with: {'; '.join(found)}.")
    print("Next: open Claude Code in each project; tell one session to join as the architect.")
    return 0


def observer(port: int, state_dir: str, args) -> int:
    start(port, state_dir)
    print_link(port, state_dir, common.OBSERVER_TOKEN_FILE, "Read-only dashboard")
    return 0


def archive_room(port: int, state_dir: str, args) -> int:
    client = operator_client(port, state_dir)
    try:
        rooms = [r for r in client_ok(client, "GET", "/rooms")["rooms"] if not r["archived"]]
        match = [r for r in rooms if r["name"] == args.archive_room]
        if not match:
            raise StateError(f"no open room named {args.archive_room}; open rooms: "
                             + (", ".join(r["name"] for r in rooms) or "none"))
        client_ok(client, "POST", "/operator/archive", {"room": match[0]["id"]})
    finally:
        client.close()
    print(f"Archived room {args.archive_room}: its peers were told, its history stays readable on the dashboard; "
          "the project's next session starts a fresh room.")
    return 0


def rotate_tokens(port: int, state_dir: str, args) -> int:
    """New operator and observer tokens; a running broker is restarted to take them (sessions rejoin)."""
    common.ensure_state_dir(state_dir, create=False)
    running = broker_running(port, state_dir)
    if running:
        stop(port, state_dir)
    for name in (common.OPERATOR_TOKEN_FILE, common.OBSERVER_TOKEN_FILE):
        common.write_secret(state_dir, name)
    print("New operator and observer tokens written; open dashboards must be opened again.")
    if running:
        start(port, state_dir)
        print_link(port, state_dir, common.OPERATOR_TOKEN_FILE, "Dashboard")
    return 0


def run_doctor(port: int, state_dir: str, args) -> int:
    from ctl import install
    checks = operations.doctor(port, state_dir, registered_anywhere()) + install.hook_checks()
    for ok, what, fix in checks:
        print(f"{'ok ' if ok else 'FIX'} {printable(what)}" + ("" if ok else f"\n    -> {fix}"))
    return 0 if all(ok for ok, _, _ in checks) else 1


def foreground(port: int, state_dir: str, args) -> int:
    """The broker attached to this terminal (its log here), with the dashboard link once it answers."""
    import subprocess
    child = subprocess.Popen(entry_command("broker") + ["--port", str(port), "--state-dir", state_dir])
    try:
        deadline = time.monotonic() + 10
        while child.poll() is None and not broker_running(port, state_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        if child.poll() is None:
            print_link(port, state_dir, common.OPERATOR_TOKEN_FILE, "Dashboard (operator; keep the link private)")
            sys.stdout.flush()
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        return child.wait()


ACTIONS = {   # option -> (what it does, handler(port, state_dir, args))
    "status": ("print every open room at a glance", lambda port, state_dir, args: status(port, state_dir)),
    "stop": ("stop the broker", lambda port, state_dir, args: stop(port, state_dir)),
    "foreground": ("run the broker attached to this terminal", foreground),
    "observer": ("print a one-time read-only dashboard link", observer),
    "archive_room": ("archive the open room NAME: its history stays readable, the project starts fresh", archive_room),
    "backup": ("write an online, consistent copy of the database to FILE (0600)",
               lambda port, state_dir, args: print(operations.backup(state_dir, args.backup))),
    "restore": ("bring back a backup FILE (stop the broker first)",
                lambda port, state_dir, args: print(operations.restore(state_dir, args.restore, recorded_pid(state_dir)))),
    "export": ("write each room's history to DIR as JSON Lines and a Markdown transcript (--room NAME for one)",
               lambda port, state_dir, args: print(operations.export(state_dir, args.export, args.room))),
    "doctor": ("check the installation and say how to fix what is wrong", run_doctor),
    "rotate_tokens": ("replace the operator and observer tokens", rotate_tokens),
}
WITH_VALUE = {"archive_room": "NAME", "backup": "FILE", "restore": "FILE", "export": "DIR"}


@quiet_pipe
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start Control Tower Lite and open its dashboard.")
    common.add_location_args(parser)
    action = parser.add_mutually_exclusive_group()
    for name, (description, _) in ACTIONS.items():
        flag = "--" + name.replace("_", "-")
        if name in WITH_VALUE:
            action.add_argument(flag, metavar=WITH_VALUE[name], help=description)
        else:
            action.add_argument(flag, action="store_true", help=description)
    parser.add_argument("--room", help="with --export: only the room of this name")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    args = parser.parse_args(argv)
    chosen = next((name for name in ACTIONS if getattr(args, name) not in (None, False)), None)
    try:
        port = common.resolve_port(args.port)
        state_dir = common.resolve_state_dir(args.state_dir)
        handler = ACTIONS[chosen][1] if chosen else launch
        return handler(port, state_dir, args) or 0
    except BrokenPipeError:
        raise                                   # not a failure: quiet_pipe ends it quietly
    except (StateError, BrokerUnavailable, operations.OperationError, OSError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
