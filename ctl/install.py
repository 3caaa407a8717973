#!/usr/bin/env python3
"""Register the Control Tower Lite MCP server with Claude Code (or Codex CLI, Gemini CLI, Cursor).

    python3 install.py                      Claude Code, for this user (via `claude mcp add`, else ~/.claude.json)
    python3 install.py --scope project DIR  Claude Code, DIR/.mcp.json
    python3 install.py --client codex       ~/.codex/config.toml   (gemini: ~/.gemini/settings.json,
                                           cursor: .cursor/mcp.json in DIR, or ~/.cursor with --scope user)
    python3 install.py --print ...          show what would be written, write nothing
    python3 install.py --uninstall ...      remove exactly what install added
    python3 install.py --status             where it is registered, and a real MCP handshake with it

Config files are edited atomically (temp file, rename), keeping every other key, with a backup
beside them (`.ctl-backup`), and never when they cannot be parsed.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from ctl import common, entry_command, user_command

SERVER_NAME = "ctl"     # short on purpose: it prefixes every tool name the model sees
try:
    import tomllib
except ImportError:       # Python 3.10: written TOML is still checked by our own reader of our section
    tomllib = None


class InstallError(Exception):
    """Something is wrong with a config file or the environment; the message says what to do."""


def server_command(args) -> list:
    command = entry_command("mcp")
    if args.port is not None:
        command += ["--port", str(common.resolve_port(args.port))]
    if args.state_dir is not None:
        command += ["--state-dir", common.resolve_state_dir(args.state_dir)]
    return command


def json_entry(command: list, client: str) -> dict:
    entry = {"command": command[0], "args": command[1:]}
    return {"type": "stdio", **entry} if client == "claude" else entry


# ---------------------------------------------------------------- careful file edits


def read_text(path: str):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read {path}: {exc}")


def write_atomically(path: str, text: str, old_text) -> None:
    """Back up the old file once per change, then replace it in one rename; nothing half-written."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        if old_text is not None:
            shutil.copy2(path, path + ".ctl-backup")
        tmp = f"{path}.ctl-tmp-{os.getpid()}"
        mode = os.stat(path).st_mode & 0o777 if old_text is not None else 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}; check its folder's permissions")


def load_json_config(path: str):
    text = read_text(path)
    if text is None or not text.strip():
        return text, {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"{path} is not valid JSON ({exc}); fix or move it first, it was left untouched")
    if not isinstance(data, dict):
        raise InstallError(f"{path} does not hold a JSON object; fix or move it first, it was left untouched")
    return text, data


def edit_json(path: str, entry, remove: bool) -> str:
    """Add, replace or remove mcpServers.ctl; return what happened, in words."""
    text, data = load_json_config(path)
    servers = data.get("mcpServers", {})
    if not isinstance(servers, dict):
        raise InstallError(f"{path} has an mcpServers that is not an object; fix it first, it was left untouched")
    if remove:
        if SERVER_NAME not in servers:
            return f"not registered in {path}; nothing to remove"
        del servers[SERVER_NAME]
        verb = "removed from"
    else:
        if servers.get(SERVER_NAME) == entry:
            return f"already registered in {path}; nothing changed"
        verb = "updated in" if SERVER_NAME in servers else "registered in"
        servers[SERVER_NAME] = entry
    data["mcpServers"] = servers
    write_atomically(path, json.dumps(data, indent=2) + "\n", text)
    return f"{verb} {path}"


TOML_SECTION = re.compile(r"(?ms)^\[mcp_servers\.ctl\][^\n]*\n.*?(?=^\[|\Z)")


def codex_section(command: list) -> str:
    quoted = [json.dumps(part) for part in command]      # a JSON string is a valid TOML basic string
    return f"[mcp_servers.{SERVER_NAME}]\ncommand = {quoted[0]}\nargs = [{', '.join(quoted[1:])}]\n"


def edit_codex(path: str, command: list, remove: bool) -> str:
    text = read_text(path)
    if text is not None and tomllib is not None:
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InstallError(f"{path} is not valid TOML ({exc}); fix or move it first, it was left untouched")
    current = text or ""
    section = codex_section(command)
    found = TOML_SECTION.search(current)
    if remove:
        if not found:
            return f"not registered in {path}; nothing to remove"
        updated, verb = current[:found.start()] + current[found.end():], "removed from"
    elif found and found.group(0).strip() == section.strip():
        return f"already registered in {path}; nothing changed"
    elif found:
        updated, verb = current[:found.start()] + section + "\n" + current[found.end():].lstrip("\n"), "updated in"
    else:
        updated, verb = current + ("\n" if current and not current.endswith("\n\n") else "") + section, "registered in"
    write_atomically(path, updated.rstrip("\n") + "\n" if updated.strip() else "", text)
    return f"{verb} {path}"


# ---------------------------------------------------------------- targets


def home(*parts) -> str:
    return os.path.join(os.path.expanduser("~"), *parts)


def target_path(args) -> str:
    project = os.path.abspath(args.dir or os.getcwd())
    if args.client == "claude":
        return os.path.join(project, ".mcp.json") if args.scope == "project" else home(".claude.json")
    if args.client == "codex":
        return home(".codex", "config.toml")
    if args.client == "gemini":
        return os.path.join(project, ".gemini", "settings.json") if args.scope == "project" else home(".gemini", "settings.json")
    return home(".cursor", "mcp.json") if args.scope == "user" else os.path.join(project, ".cursor", "mcp.json")


def snippet(args, command: list) -> str:
    if args.client == "codex":
        return codex_section(command).rstrip("\n")
    return json.dumps({"mcpServers": {SERVER_NAME: json_entry(command, args.client)}}, indent=2)


def claude_cli():
    return shutil.which("claude")


def install_with_claude_cli(cli: str, args, command: list) -> str:
    """Claude Code's own CLI for user scope; a stale registration (another path) is replaced."""
    path = home(".claude.json")
    _, data = load_json_config(path)
    existing = data.get("mcpServers", {}).get(SERVER_NAME) if isinstance(data.get("mcpServers"), dict) else None
    if args.uninstall:
        if existing is None:
            return "not registered with Claude Code; nothing to remove"
        run_cli(cli, ["mcp", "remove", "--scope", "user", SERVER_NAME])
        return "removed from Claude Code (claude mcp remove)"
    if existing is not None and existing.get("command") == command[0] and existing.get("args") == command[1:]:
        return "already registered with Claude Code; nothing changed"
    if existing is not None:
        run_cli(cli, ["mcp", "remove", "--scope", "user", SERVER_NAME])
    run_cli(cli, ["mcp", "add", "--scope", "user", SERVER_NAME, "--", *command])
    return "registered with Claude Code (claude mcp add --scope user)"


def run_cli(cli: str, arguments: list) -> None:
    result = subprocess.run([cli, *arguments], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise InstallError(f"`claude {' '.join(arguments[:3])}` failed: {(result.stderr or result.stdout).strip()}")


# ---------------------------------------------------------------- status: a real handshake


def handshake(command: list, timeout: float = 10.0) -> str:
    """Start the registered server, initialize, list tools; return a one-line verdict."""
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return f"FAILED to start ({exc})"
    requests = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                            "clientInfo": {"name": "ctl-install", "version": "1"}}},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]
    try:
        out, _ = proc.communicate("".join(json.dumps(r) + "\n" for r in requests).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "FAILED: no answer within the timeout"
    replies = {}
    for line in out.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            return f"FAILED: wrote a non-protocol line on stdout: {line[:80]!r}"
        replies[message.get("id")] = message
    if 1 not in replies or 2 not in replies or "result" not in replies[2]:
        return "FAILED: the MCP handshake did not complete"
    info = replies[1]["result"]["serverInfo"]
    tools = replies[2]["result"]["tools"]
    return f"OK: {info['name']} {info['version']} answered with {len(tools)} tools"


def status(args) -> int:
    print(f"Server name: {SERVER_NAME}; this copy: {shlex.join(entry_command('mcp'))}")
    found = False
    places = [("Claude Code (user)", home(".claude.json")),
              ("Claude Code (project)", os.path.join(os.path.abspath(args.dir or os.getcwd()), ".mcp.json")),
              ("Gemini CLI", home(".gemini", "settings.json")), ("Cursor (user)", home(".cursor", "mcp.json")),
              ("Cursor (project)", os.path.join(os.path.abspath(args.dir or os.getcwd()), ".cursor", "mcp.json"))]
    for label, path in places:
        try:
            _, data = load_json_config(path)
        except InstallError as exc:
            print(f"  {label}: {exc}")
            continue
        entry = data.get("mcpServers", {}).get(SERVER_NAME) if isinstance(data.get("mcpServers"), dict) else None
        if entry:
            found = True
            command = [entry.get("command", "")] + list(entry.get("args", []))
            script = next((part for part in command if part.endswith("mcp_server.py")), None)
            stale = f" (STALE: that file no longer exists; run {user_command('install')} again)" \
                if script and not os.path.exists(script) else ""
            print(f"  {label}: {path}{stale}\n    {' '.join(command)}\n    handshake: {handshake(command)}")
    codex = read_text(home(".codex", "config.toml")) or ""
    if TOML_SECTION.search(codex):
        found = True
        print(f"  Codex CLI: {home('.codex', 'config.toml')}")
    if not found:
        print(f"  not registered anywhere; run: {user_command('install')}")
        return 1
    return 0


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Register Control Tower Lite's MCP server with your coding agent.")
    parser.add_argument("--client", choices=("claude", "codex", "gemini", "cursor"), default="claude")
    parser.add_argument("--scope", choices=("user", "project"), default=None,
                        help="user (default; cursor: project) or project")
    parser.add_argument("dir", nargs="?", help="project directory for --scope project (default: here)")
    parser.add_argument("--uninstall", action="store_true", help="remove the registration")
    parser.add_argument("--status", action="store_true", help="show registrations and test them")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the config, write nothing")
    common.add_location_args(parser)
    args = parser.parse_args(argv)
    if args.scope is None:
        args.scope = "project" if args.client == "cursor" else "user"
    try:
        if args.status:
            return status(args)
        command = server_command(args)
        if args.print_only:
            print(f"# {target_path(args)}\n{snippet(args, command)}")
            return 0
        cli = claude_cli() if args.client == "claude" and args.scope == "user" else None
        if cli:
            outcome = install_with_claude_cli(cli, args, command)
        elif args.client == "codex":
            outcome = edit_codex(target_path(args), command, args.uninstall)
        else:
            entry = None if args.uninstall else json_entry(command, args.client)
            outcome = edit_json(target_path(args), entry, args.uninstall)
    except (InstallError, common.StateError) as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1
    print(f"Control Tower Lite MCP server '{SERVER_NAME}' {outcome}.")
    if not args.uninstall:
        agent = {"claude": "Claude Code", "codex": "Codex", "gemini": "Gemini CLI", "cursor": "Cursor"}[args.client]
        print(f"Next: {user_command('launch')} (starts the broker, opens the dashboard); then open {agent} "
              "in each project and ask it to join the room.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
