"""Register Control Tower Lite with Claude Code (or Codex CLI, Gemini CLI, Cursor), and its hooks.

    python3 install.py                      Claude Code, for this user (~/.claude.json)
    python3 install.py --scope project DIR  Claude Code, DIR/.mcp.json (portable: no interpreter path)
    python3 install.py --client codex       ~/.codex/config.toml   (gemini: ~/.gemini/settings.json,
                                            cursor: DIR/.cursor/mcp.json, or ~/.cursor with --scope user)
    python3 install.py --hooks              also Claude Code hooks (~/.claude/settings.json; --scope project:
                                            DIR/.claude/settings.json): locks that hold, messages that arrive
    python3 install.py --git-hook [DIR]     a pre-commit guard for files other peers have locked
    python3 install.py --print ...          show what would be written, write nothing
    python3 install.py --uninstall ...      undo: every file exactly as it was before
    python3 install.py --status             each client: what is registered, stale or not, a real handshake

Files are edited atomically (temp file, rename), keeping every other key and the file's own layout,
and never when they cannot be parsed. What a file held before is kept in a 0600 receipt in the state
directory, so --uninstall restores it byte for byte when nothing else changed it since.
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from ctl import CHECKOUT, ENTRY_POINTS, common, dialects, entry_command, quiet_pipe, user_command

SERVER_NAME = "ctl"     # short on purpose: it prefixes every tool name the model sees
PLUGIN_ID = "ctl@control-tower-lite"
HOOK_EVENTS = {         # event -> matcher (None: every occurrence)
    "PreToolUse": "Edit|Write|NotebookEdit|Bash|Monitor",   # the tools of Claude Code 2.1.332 that write files
    "PostToolUse": "Bash|Monitor",                          # its tools that run shell commands
    "PostToolUseFailure": "Bash|Monitor",                   # the same, when the command exits non-zero
    "Stop": None,
    "SessionStart": None,
}
BACKGROUND_HOOKS = {    # Claude Code only: our hook -> (its event, what the hook entry adds)
    "Wait": ("Stop", {"asyncRewake": True, "timeout": 86400}),     # wakes an idle session (hooks.py Wait)
}
GIT_GUARD_MARK = "# control-tower-lite git guard"
try:
    import tomllib
except ImportError:       # Python 3.10: written TOML is still checked by our own reader of our section
    tomllib = None


class InstallError(Exception):
    """Something is wrong with a config file or the environment; the message says what to do."""


# ---------------------------------------------------------------- what to run


def location_args(args) -> list:
    """--port and --state-dir whenever they differ from the defaults: from the flags or CTL_PORT/CTL_STATE_DIR,
    but only from the flags for a project's file, which is committed and shared with other machines."""
    shared = args.scope == "project"
    port = (args.port or common.DEFAULT_PORT) if shared else common.resolve_port(args.port)
    state_dir = common.resolve_state_dir(args.state_dir or common.DEFAULT_STATE_DIR) if shared \
        else common.resolve_state_dir(args.state_dir)
    extra = [] if port == common.DEFAULT_PORT else ["--port", str(port)]
    if state_dir != common.resolve_state_dir(common.DEFAULT_STATE_DIR):
        extra += ["--state-dir", state_dir]
    return extra


def portable_command(name: str) -> list:
    """For files shared in a repository: the installed command if there is one, else `python3 <path>`."""
    flat, module, script = ENTRY_POINTS[name]
    if shutil.which(script) and not os.path.isfile(os.path.join(CHECKOUT, flat)):
        return [script]
    command = entry_command(name)
    return ["python3", *command[1:]]


def server_command(args) -> list:
    base = portable_command("mcp") if args.scope == "project" else entry_command("mcp")
    return base + location_args(args)


def hook_command(args, event: str) -> str:
    base = portable_command("hook") if args.scope == "project" else entry_command("hook")
    client = [] if args.client == "claude" else ["--client", args.client]
    return shlex.join(base + location_args(args) + client + [event])


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


def write_atomically(path: str, text, mode=None) -> None:
    """Replace the file in one rename (or remove it when text is None); nothing half-written."""
    try:
        if text is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if mode is None:
            mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o600
        tmp = f"{path}.ctl-tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}; check its folder's permissions")


def load_json(path: str, text):
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"{path} is not valid JSON ({exc}); fix or move it first, it was left untouched")
    if not isinstance(data, dict):
        raise InstallError(f"{path} does not hold a JSON object; fix or move it first, it was left untouched")
    return data


def dump_json_like(data: dict, old_text) -> str:
    """JSON in the old file's own indentation and final newline, so the diff shows only what changed."""
    indent = 2
    if old_text:
        found = re.search(r"\n([ \t]+)\S", old_text)
        indent = found.group(1) if found else None
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return text + ("\n" if old_text is None or old_text.endswith("\n") else "")


def json_edit(key: str, update):
    """A text -> text edit of the JSON object under `key`; `update(obj)` changes it in place. Unchanged
    content gives back the very same text, so nothing is rewritten for nothing."""
    def edit(path, text):
        original = load_json(path, text)
        data = load_json(path, text)
        holder = data.setdefault(key, {})
        if not isinstance(holder, dict):
            raise InstallError(f"{path} has a {key} that is not an object; fix it first, it was left untouched")
        update(holder)
        if holder == {} and key not in original:
            del data[key]                               # an empty object of our own making
        return text if data == original else dump_json_like(data, text)
    return edit


TOML_SECTION = re.compile(r"(?ms)^\[mcp_servers\.ctl\][^\n]*\n.*?(?=^\[|\Z)")


def codex_section(command: list) -> str:
    quoted = [json.dumps(part) for part in command]      # a JSON string is a valid TOML basic string
    return f"[mcp_servers.{SERVER_NAME}]\ncommand = {quoted[0]}\nargs = [{', '.join(quoted[1:])}]\n"


def toml_edit(section):
    def edit(path, text):
        if text is not None and tomllib is not None:
            try:
                tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise InstallError(f"{path} is not valid TOML ({exc}); fix or move it first, it was left untouched")
        current = text or ""
        found = TOML_SECTION.search(current)
        if section is None:
            return text if not found else current[:found.start()] + current[found.end():]
        if found and found.group(0).strip() == section.strip():
            return text
        if found:
            return current[:found.start()] + section + "\n" + current[found.end():].lstrip("\n")
        return current + ("\n" if current and not current.endswith("\n\n") else "") + section
    return edit


# ---------------------------------------------------------------- receipts: exact undo


def receipt_path(state_dir: str, path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24]
    return os.path.join(state_dir, "install", f"{digest}.json")


def change_file(path: str, edit, remove: bool, state_dir: str, mode=None) -> str:
    """Apply an edit; on install keep what the file held before; on removal give exactly that back when
    the file is as we left it, else remove only our part. Returns what happened, in words."""
    text = read_text(path)
    new = edit(path, text)
    receipt_file = receipt_path(state_dir, path)
    receipt = json.loads(read_text(receipt_file) or "null")
    if remove:
        if new == text:
            return f"not registered in {path}; nothing to remove"
        exact = bool(receipt) and receipt["after"] == text and edit(path, receipt["before"]) == receipt["before"]
        if exact:                                       # (a "before" that holds ours, put back by hand, is not)
            new = receipt["before"]
        elif receipt and receipt["before"] is None and (new or "").strip() in ("", "{}"):
            new = None                                  # a file we created, holding nothing else now
        write_atomically(path, new, mode)
        for folder in (receipt or {}).get("made_dirs", []):
            if new is None and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if os.path.exists(receipt_file):
            os.unlink(receipt_file)
        for folder in (os.path.dirname(receipt_file), state_dir):       # leave no empty folder of ours behind
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        return f"removed from {path}" + (" (the file is back exactly as it was)" if exact else "")
    if new == text:
        return f"already registered in {path}; nothing changed"
    made_dirs = []
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        made_dirs.append(folder)
        folder = os.path.dirname(folder)
    write_atomically(path, new, mode)
    original = receipt["before"] if receipt and receipt["after"] == text else text
    kept_dirs = receipt["made_dirs"] if receipt and receipt["after"] == text else made_dirs
    common.ensure_state_dir(state_dir)
    os.makedirs(os.path.dirname(receipt_file), mode=0o700, exist_ok=True)
    write_atomically(receipt_file, json.dumps({"path": path, "before": original, "after": new, "made_dirs": kept_dirs}),
                     0o600)
    return f"{'updated in' if receipt and receipt['after'] == text else 'registered in'} {path}"


# ---------------------------------------------------------------- targets


def home(*parts) -> str:
    return os.path.join(os.path.expanduser("~"), *parts)


@dataclass(frozen=True)
class Client:
    label: str
    user_path: tuple          # below the home directory
    project_path: tuple       # below the project directory (empty: no project scope)
    kind: str                 # json | toml


CLIENTS = {
    "claude": Client("Claude Code", (".claude.json",), (".mcp.json",), "json"),
    "codex": Client("Codex CLI", (".codex", "config.toml"), (), "toml"),
    "gemini": Client("Gemini CLI", (".gemini", "settings.json"), (".gemini", "settings.json"), "json"),
    "cursor": Client("Cursor", (".cursor", "mcp.json"), (".cursor", "mcp.json"), "json"),
}


def project_dir(args) -> str:
    return os.path.abspath(args.dir or os.getcwd())


def target_path(args) -> str:
    client = CLIENTS[args.client]
    if args.scope == "project":
        if not client.project_path:
            raise InstallError(f"{client.label} has no project-scope configuration; use --scope user")
        return os.path.join(project_dir(args), *client.project_path)
    return home(*client.user_path)


def server_edit(args, command):
    if CLIENTS[args.client].kind == "toml":
        edit = toml_edit(None if args.uninstall else codex_section(command))
        if not args.uninstall:
            return edit
        ours = []
        if has_our_hooks(home(*HOOK_FILES["codex"])):
            try:                                # our trust records go with our server (asked while hooks.json
                ours = codex_hooks(project_dir(args))   # still names our hooks)
            except InstallError:
                pass
        untrust = codex_trust_edit(ours, trust=False)
        return lambda path, text: untrust(path, edit(path, text))
    entry = json_entry(command, args.client)

    def update(servers):
        if args.uninstall:
            servers.pop(SERVER_NAME, None)
        else:
            servers[SERVER_NAME] = entry
    return json_edit("mcpServers", update)


HOOK_FILES = {           # client -> where its hooks live, below the home or the project directory
    "claude": (".claude", "settings.json"),
    "codex": (".codex", "hooks.json"),
    "gemini": (".gemini", "settings.json"),
}


def settings_path(args) -> str:
    if args.client not in HOOK_FILES:
        raise InstallError(f"{CLIENTS[args.client].label} hooks are not supported; leave out --hooks")
    return os.path.join(project_dir(args), *HOOK_FILES[args.client]) if args.scope == "project" \
        else home(*HOOK_FILES[args.client])


def hook_events(client: str) -> dict:
    """Our hook -> (the client's event, its matcher): Claude Code's list here, the others' in dialects.py."""
    if client == "claude":
        return {**{event: (event, matcher) for event, matcher in HOOK_EVENTS.items()},
                **{ours: (event, None) for ours, (event, _) in BACKGROUND_HOOKS.items()}}
    return dialects.CLIENTS[client].events


def is_ours(group) -> bool:
    return isinstance(group, dict) and any(
        isinstance(h, dict) and re.search(r"(hook\.py|ctl\.hooks|ctl-hook)\b", str(h.get("command", "")))
        for h in group.get("hooks", []))


def hooks_edit(args):
    scale = dialects.CLIENTS[args.client].timeout_scale

    def update(hooks):
        events = {}                     # the client's event -> our hooks on it (Stop has two)
        for ours, (event, matcher) in hook_events(args.client).items():
            events.setdefault(event, []).append((ours, matcher))
        for event, entries in events.items():
            groups = [g for g in hooks.get(event, []) if not is_ours(g)]
            for ours, matcher in entries if not args.uninstall else ():
                hook = {"type": "command", "command": hook_command(args, ours), "timeout": 10 * scale,
                        **BACKGROUND_HOOKS.get(ours, (None, {}))[1]}
                groups.append({"matcher": matcher, "hooks": [hook]} if matcher else {"hooks": [hook]})
            if groups:
                hooks[event] = groups
            else:
                hooks.pop(event, None)
    edit = json_edit("hooks", update)
    if args.client != "gemini" or args.uninstall:
        return edit
    enable = json_edit("hooksConfig", lambda config: config.update(enabled=True))   # Gemini's master switch
    return lambda path, text: enable(path, edit(path, text))


# ---------------------------------------------------------------- the git guard


def git_hook_path(folder: str) -> str:
    try:
        hooks = subprocess.run(["git", "rev-parse", "--git-path", "hooks"], cwd=folder, capture_output=True,
                               text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot run git in {folder}: {exc}")
    if hooks.returncode != 0:
        raise InstallError(f"{folder} is not inside a git repository")
    return os.path.join(folder, hooks.stdout.strip(), "pre-commit")


def git_guard_script(args) -> str:
    command = shlex.join(entry_command("hook") + location_args(args) + ["git-pre-commit"])
    return (f"#!/bin/sh\n{GIT_GUARD_MARK} (remove: {user_command('install')} --git-hook --uninstall)\n"
            'if [ -x "$0.ctl-chained" ]; then "$0.ctl-chained" "$@" || exit $?; fi\n'
            f"exec {command}\n")


def install_git_hook(args) -> str:
    path = git_hook_path(project_dir(args))
    chained = path + ".ctl-chained"
    current = read_text(path)
    ours = current is not None and GIT_GUARD_MARK in current
    if args.uninstall:
        if not ours:
            return f"no git guard in {path}; nothing to remove"
        os.unlink(path)
        if os.path.exists(chained):
            os.rename(chained, path)
        return f"git guard removed from {path}" + (" (your own pre-commit hook is back in place)"
                                                   if os.path.exists(path) else "")
    if current is not None and not ours:
        os.rename(path, chained)
    write_atomically(path, git_guard_script(args), 0o755)
    return f"git guard installed in {path}" + (" (your existing pre-commit hook still runs first)"
                                               if os.path.exists(chained) else "")


# ---------------------------------------------------------------- will the hooks run: each client's trust


def codex_hooks(folder: str, timeout: float = 30.0) -> list:
    """Our hooks as Codex itself sees them for `folder` (its app-server's hooks/list, the API behind its /hooks
    screen): each with its trust key, current hash and trustStatus. Raises InstallError when Codex cannot say."""
    import select
    codex = shutil.which("codex")
    if codex is None:
        raise InstallError("the codex command is not on PATH")
    messages = [{"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "ctl-install", "version": "1"}}},
                {"method": "initialized"}, {"id": 2, "method": "hooks/list", "params": {"cwds": [folder]}}]
    try:
        proc = subprocess.Popen([codex, "app-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError as exc:
        raise InstallError(f"cannot run codex app-server: {exc}")
    try:
        proc.stdin.write("".join(json.dumps({"jsonrpc": "2.0", **m}) + "\n" for m in messages).encode())
        proc.stdin.flush()
        deadline, buffer = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.split(b"\n")[:-1]:
                reply = json.loads(line) if line.strip().startswith(b"{") else {}
                if reply.get("id") == 2:
                    if "result" not in reply:
                        raise InstallError(f"codex app-server refused hooks/list: {reply.get('error')}")
                    mine = os.path.realpath(home(*HOOK_FILES["codex"]))     # never a project's own hooks.json
                    return [hook for entry in reply["result"]["data"] for hook in entry["hooks"]
                            if os.path.realpath(hook.get("sourcePath") or "") == mine
                            and re.search(r"(hook\.py|ctl\.hooks|ctl-hook)\b", hook.get("command") or "")]
        raise InstallError("codex app-server did not list its hooks in time")
    except (OSError, ValueError) as exc:
        raise InstallError(f"codex app-server: {exc}")
    finally:
        proc.kill()
        proc.wait()


def trust_block(key: str) -> re.Pattern:
    """Exactly the two lines we write for one hook (and the blank line before them), nothing a person added."""
    return re.compile(r"(?m)\n?^\[hooks\.state\." + re.escape(json.dumps(key)) + r"\]\ntrusted_hash = \"[^\"\n]*\"\n")


def codex_trust_edit(hooks: list, trust: bool):
    """config.toml with (or without) Codex's trust records for these hooks: `[hooks.state."<key>"]` holding the
    hash Codex computed, exactly what its /hooks screen writes when a person trusts them."""
    def edit(path, text):
        current = text or ""
        for hook in hooks:
            current = trust_block(hook["key"]).sub("", current)
            if trust:
                current += ("\n" if current and not current.endswith("\n\n") else "") + \
                    f"[hooks.state.{json.dumps(hook['key'])}]\ntrusted_hash = {json.dumps(hook['currentHash'])}\n"
        if tomllib is not None and current != (text or ""):
            try:
                tomllib.loads(current)
            except tomllib.TOMLDecodeError as exc:
                raise InstallError(f"{path}: Codex's hook trust cannot be recorded there ({exc}); trust the hooks "
                                   "in codex with /hooks instead")
        return text if current == (text or "") else current
    return edit


def gemini_home(*parts) -> str:
    return os.path.join(os.environ.get("GEMINI_CLI_HOME") or os.path.expanduser("~"), ".gemini", *parts)


def gemini_folder_trust(folder: str):
    """(trusted, why) as Gemini CLI decides it: an untrusted folder gets no MCP servers (so no session, and
    hooks with nothing to act for). Longest matching rule of trustedFolders.json wins."""
    forced = os.environ.get("GEMINI_CLI_TRUST_WORKSPACE")
    if forced in ("true", "false"):
        return forced == "true", f"GEMINI_CLI_TRUST_WORKSPACE={forced}"
    settings = load_json("settings.json", read_text(gemini_home("settings.json")))
    if (settings.get("security") or {}).get("folderTrust", {}).get("enabled") is False:
        return True, "folder trust is off in its settings"
    path = os.environ.get("GEMINI_CLI_TRUSTED_FOLDERS_PATH") or gemini_home("trustedFolders.json")
    rules = load_json(path, read_text(path))
    here, best = os.path.realpath(folder), (-1, None)
    for rule, level in rules.items():
        base = os.path.realpath(os.path.dirname(rule) if level == "TRUST_PARENT" else rule)
        if (here == base or here.startswith(base.rstrip(os.sep) + os.sep)) and len(rule) > best[0]:
            best = (len(rule), level)
    if best[1] in ("TRUST_FOLDER", "TRUST_PARENT"):
        return True, f"trusted in {path}"
    return False, f"{folder} is {'distrusted' if best[1] == 'DO_NOT_TRUST' else 'not trusted'} in {path}"


def gemini_trust_edit(folder: str, trust: bool):
    def edit(path, text):
        data = load_json(path, text)
        before = dict(data)
        if trust:
            data[folder] = "TRUST_FOLDER"
        else:
            data.pop(folder, None)
        return text if data == before else dump_json_like(data, text)
    return edit


def trust_codex_hooks(args, config_path: str, state_dir: str) -> str:
    """Record Codex's trust in exactly the hooks just written (it skips untrusted hooks without a word)."""
    written = {hook_command(args, ours) for ours in hook_events("codex")}
    try:
        hooks = [h for h in codex_hooks(project_dir(args)) if h["command"] in written]   # exactly ours, no other
    except InstallError as exc:
        return (f"Codex's trust in the hooks NOT recorded ({exc}): until you approve them in codex with /hooks, "
                "Codex skips them")
    outcome = change_file(config_path, codex_trust_edit(hooks, trust=True), False, state_dir)
    return f"{len(hooks)} hooks trusted for Codex ({outcome.replace('registered in', 'recorded in', 1)})"


def missing_hooks(client: str, path: str) -> list:
    """The client's events where this file lacks one of our hooks as this release installs it (event and
    matcher): an install by an older release, which would leave, say, shell writes unreported."""
    hooks = load_json(path, read_text(path)).get("hooks", {})
    have = {(event, group.get("matcher"), str(hook.get("command", "")).rpartition(" ")[2])
            for event, groups in (hooks.items() if isinstance(hooks, dict) else ()) if isinstance(groups, list)
            for group in groups if is_ours(group) for hook in group["hooks"] if isinstance(hook, dict)}
    return sorted({event for ours, (event, matcher) in hook_events(client).items()
                   if (event, matcher, ours) not in have})


def hooks_verdict(client: str, folder: str, path: str) -> tuple:
    """(will run, what) for our hooks in one file of one client."""
    fix = f"{user_command('install')} --client {client}"
    try:
        missing = missing_hooks(client, path)
    except InstallError as exc:
        return False, f"cannot read them ({exc})"
    if missing:
        scope = "" if path == home(*HOOK_FILES[client]) else f" --scope project {folder}"
        return False, (f"OUTDATED: installed by an older release ({', '.join(missing)} missing or different); "
                       f"fix: {fix} --hooks{scope}")
    if client == "codex":
        try:
            hooks = codex_hooks(folder)
        except InstallError as exc:
            return False, f"cannot tell whether Codex trusts them ({exc})"
        waiting = [h for h in hooks if h["trustStatus"] not in ("trusted", "managed") or not h["enabled"]]
        if not hooks or waiting:
            states = ", ".join(sorted({h["trustStatus"] if h["enabled"] else "disabled" for h in waiting})) or "unseen"
            return False, f"NOT RUNNING: Codex skips hooks it has not trusted ({states}); fix: {fix} --hooks"
        return True, f"trusted by Codex: {len(hooks)} hooks will run"
    if client == "gemini":
        settings = load_json("settings.json", read_text(gemini_home("settings.json")))
        config = settings.get("hooksConfig") if isinstance(settings.get("hooksConfig"), dict) else {}
        if config.get("enabled") is False:
            return False, f"NOT RUNNING: hooksConfig.enabled is false in {gemini_home('settings.json')}; fix: {fix} --hooks"
        trusted, why = gemini_folder_trust(folder)
        if not trusted:
            return False, f"NOT RUNNING: {why}, so Gemini CLI disables the server there; fix: {fix} --trust {folder}"
        return True, f"enabled, folder {why}: they will run in {folder}"
    return True, "Claude Code runs them"




def handshake(command: list, timeout: float = 10.0) -> str:
    """Start the registered server, initialize, list tools; return a one-line verdict."""
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return f"FAILED to start ({exc})"
    requests = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",      # no `initialized`: a probe must not
                 "params": {"protocolVersion": "2025-11-25", "capabilities": {},     # join a room or start a broker
                            "clientInfo": {"name": "ctl-install", "version": "1"}}},
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
    return f"answers ({info['name']} {info['version']}, {len(replies[2]['result']['tools'])} tools)"


def plugin_installed() -> bool:
    data = load_json("installed_plugins.json", read_text(home(".claude", "plugins", "installed_plugins.json")))
    plugins = data.get("plugins", data)
    return isinstance(plugins, dict) and PLUGIN_ID in plugins


def found_entries(folder: str):
    """(label, path, command) of every registration of ours this user has, in the home and `folder`."""
    for name, client in CLIENTS.items():
        places = [("user", home(*client.user_path))]
        if client.project_path:
            places.append(("project", os.path.join(folder, *client.project_path)))
        for scope, path in places:
            text = read_text(path)
            if text is None:
                continue
            if client.kind == "toml":
                section = TOML_SECTION.search(text)
                if section:
                    found = re.findall(r'"((?:[^"\\]|\\.)*)"', section.group(0))
                    yield f"{client.label} ({scope})", path, [json.loads(f'"{part}"') for part in found]
                continue
            try:
                servers = load_json(path, text).get("mcpServers", {})
            except InstallError:
                continue
            entry = servers.get(SERVER_NAME) if isinstance(servers, dict) else None
            if isinstance(entry, dict) and "${CLAUDE_PLUGIN_ROOT}" not in json.dumps(entry):   # a plugin's own file
                yield f"{client.label} ({scope})", path, [entry.get("command", "")] + list(entry.get("args", []))


def registrations(folder: str = None) -> list:
    """One line for each place this server (or its hooks) is registered, for launch.py and the doctor."""
    folder = folder or os.getcwd()
    found = [f"{label} in {path}" for label, path, _ in found_entries(folder)]
    if plugin_installed():
        found.append(f"Claude Code plugin {PLUGIN_ID}")
    found += [f"hooks in {path}" for _, path in hook_files(folder)]
    return found


def has_our_hooks(path: str) -> bool:
    try:
        hooks = load_json(path, read_text(path)).get("hooks", {})
    except InstallError:
        return False
    return isinstance(hooks, dict) and any(is_ours(g) for groups in hooks.values() if isinstance(groups, list)
                                           for g in groups)


def hook_files(folder: str):
    """(client, path) of every file holding our hooks, in the home and in `folder` (Codex: home only)."""
    for client, parts in HOOK_FILES.items():
        places = [home(*parts)] + ([os.path.join(folder, *parts)] if CLIENTS[client].project_path else [])
        yield from ((client, path) for path in dict.fromkeys(places) if has_our_hooks(path))


def hook_checks(folder: str = None) -> list:
    """(ok, what, fix) per client with hooks installed: installed is not enough, they must also run."""
    folder = folder or os.getcwd()
    checks = []
    for client, path in hook_files(folder):
        runs, what = hooks_verdict(client, folder, path)
        checks.append((runs, f"{CLIENTS[client].label} hooks in {path}: {what}", what.rpartition("fix: ")[2]))
    return checks


def stale_reason(command: list):
    for part in command:
        if part.endswith(".py") and os.path.isabs(part) and not os.path.exists(part):
            return f"STALE: {part} no longer exists; run {user_command('install')} --hooks again"
    if command and os.path.isabs(command[0]) and not os.path.exists(command[0]):
        return f"STALE: the interpreter {command[0]} no longer exists; run {user_command('install')} --hooks again"
    return None


def status(args) -> int:
    folder = project_dir(args)
    port, state_dir = common.resolve_port(args.port), common.resolve_state_dir(args.state_dir)
    running = common.broker_running(port, state_dir)
    print(f"Broker on port {port}: {'running' if running else 'not running (sessions start it on first use)'}")
    entries = list(found_entries(folder))
    plugin = plugin_installed()
    for label, path, command in entries:
        verdict = stale_reason(command) or handshake(command)
        if label.startswith(CLIENTS["gemini"].label) and verdict.startswith("answers"):
            trusted, why = gemini_folder_trust(folder)
            if not trusted:
                verdict += (f", but Gemini CLI shows it Disabled here: {why}; fix: {user_command('install')} "
                            f"--client gemini --trust {folder}")
        print(f"  {label}: {path}\n    {shlex.join(command)}\n    {verdict}")
    if plugin:
        print(f"  Claude Code plugin: {PLUGIN_ID} is installed (its own server and hooks)")
        if any(label.startswith("Claude Code") for label, _, _ in entries):
            print(f"    DOUBLED: Claude Code also has an install.py registration; remove one: "
                  f"{user_command('install')} --uninstall")
    for client, path in hook_files(folder):
        print(f"  {CLIENTS[client].label} hooks in {path}\n    {hooks_verdict(client, folder, path)[1]}")
    if not entries and not plugin:
        print(f"  not registered anywhere; run: {user_command('install')} --hooks")
        return 1
    return 0


# ---------------------------------------------------------------- main


@quiet_pipe
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Register Control Tower Lite's MCP server with your coding agent.")
    parser.add_argument("--client", choices=tuple(CLIENTS), default="claude")
    parser.add_argument("--scope", choices=("user", "project"), default=None,
                        help="user (default; cursor: project) or project")
    parser.add_argument("dir", nargs="?", help="project directory for --scope project and --git-hook (default: here)")
    parser.add_argument("--hooks", action="store_true", help="also install the client's hooks (claude, codex, gemini;"
                        " Codex's are trusted for it, the hooks it would ask you to approve in /hooks)")
    parser.add_argument("--trust", action="store_true", help="gemini: trust the project folder DIR (default: here),"
                        " without which Gemini CLI disables every MCP server there")
    parser.add_argument("--git-hook", action="store_true", help="install (or remove) the git pre-commit guard only")
    parser.add_argument("--uninstall", action="store_true", help="remove what install added")
    parser.add_argument("--status", action="store_true", help="show registrations and test them")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the config, write nothing")
    common.add_location_args(parser)
    args = parser.parse_args(argv)
    if args.scope is None:
        args.scope = "project" if args.client == "cursor" else "user"
    try:
        state_dir = common.resolve_state_dir(args.state_dir)
        if args.status:
            return status(args)
        if args.git_hook:
            print(f"Control Tower Lite: {install_git_hook(args)}.")
            return 0
        if args.trust:
            if args.client != "gemini":
                raise InstallError("--trust is for --client gemini (Codex's hooks are trusted by --hooks)")
            folder = os.path.realpath(project_dir(args))
            trust_file = os.environ.get("GEMINI_CLI_TRUSTED_FOLDERS_PATH") or gemini_home("trustedFolders.json")
            outcome = change_file(trust_file, gemini_trust_edit(folder, not args.uninstall), args.uninstall,
                                  state_dir, 0o600)
            print(f"Control Tower Lite: {folder} {'no longer trusted' if args.uninstall else 'trusted'} by Gemini "
                  f"CLI ({outcome})." + ("" if args.uninstall else " Trust also lets that folder's own .gemini "
                                         "settings, hooks and .env apply: trust only projects you would run."))
            return 0
        command = server_command(args)
        path = target_path(args)
        if args.hooks:
            settings_path(args)                 # an unsupported client is refused before anything is written
        edit = server_edit(args, command)
        if args.print_only:
            print(f"# {path}\n{edit(path, None).rstrip()}")
            if args.hooks:
                print(f"# {settings_path(args)}\n{hooks_edit(args)(settings_path(args), None).rstrip()}")
            return 0
        if args.client == "claude" and not args.uninstall and plugin_installed():
            print(f"Control Tower Lite is already provided by the Claude Code plugin {PLUGIN_ID}; nothing written "
                  "(two registrations would double every tool).")
            return 0
        outcomes = [change_file(path, edit, args.uninstall, state_dir)]
        if args.hooks or (args.uninstall and args.client in HOOK_FILES):
            hooks_path = settings_path(args)
            outcome = change_file(hooks_path, hooks_edit(args), args.uninstall, state_dir)
            if args.hooks or not outcome.startswith("not registered"):
                outcomes.append(re.sub(r"^(registered|updated) in", "hooks in", outcome)
                                .replace("removed from", "hooks removed from", 1))
        if args.hooks and args.client == "codex" and not args.uninstall:
            outcomes.append(trust_codex_hooks(args, path, state_dir))
    except (InstallError, common.StateError) as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1
    for outcome in outcomes:
        print(f"Control Tower Lite: {outcome}.")
    if args.uninstall and args.client == "claude" and plugin_installed():
        print(f"The Claude Code plugin {PLUGIN_ID} is installed, which install.py does not remove: "
              f"claude plugin uninstall {PLUGIN_ID}; then claude plugin marketplace remove control-tower-lite.")
    if not args.uninstall:
        agent = CLIENTS[args.client].label
        print(f"Next: {user_command('launch')} (starts the broker, opens the dashboard); then open {agent} "
              "in each project and ask it to join the room.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
