"""How each coding agent speaks hooks, as one table per client over the same core (hooks.py).

A dialect says, for one client: which of its events runs which of our hooks (with what matcher and in
what timeout unit, for installing them), which of its tools write which files (and which run shell
commands), how it reads a refusal, and how it takes text at the end of a turn. The rest (the SessionStart
briefing and the report after a shell call as `hookSpecificOutput.additionalContext`, a visible warning
as `systemMessage`) all three read alike.
"""
import os

PATCH_HEADERS = ("*** Add File: ", "*** Update File: ", "*** Delete File: ", "*** Move to: ")


def field(name: str):
    """A tool that writes the one file its `name` argument names."""
    return lambda arguments: [arguments[name]] if isinstance(arguments.get(name), str) else []


def patch_paths(arguments) -> list:
    """Codex's apply_patch: every file its patch adds, updates, deletes or moves to."""
    text = arguments.get("command") if isinstance(arguments, dict) else arguments
    if not isinstance(text, str):
        return []
    paths = (line[len(header):].rstrip() for line in text.split("\n") for header in PATCH_HEADERS
             if line.startswith(header))
    return [path for path in paths if path]


def permission_deny(reason: str) -> dict:
    """Claude Code's form; Codex reads the same one and refuses any other top-level key beside it."""
    return {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                   "permissionDecisionReason": reason}}


def decision_deny(reason: str) -> dict:
    """Gemini CLI reads only a top-level decision (it ignores permissionDecision)."""
    return {"decision": "deny", "reason": reason}


def context_hand_over(text: str) -> dict:
    """Claude Code shows a Stop hook's additionalContext once and goes on with the turn; a block's reason it
    shows twice (as feedback and as an error naming our command line)."""
    return {"hookSpecificOutput": {"hookEventName": "Stop", "additionalContext": text}}


def block_hand_over(text: str) -> dict:
    """Codex and Gemini read a blocked stop's reason as the next prompt."""
    return {"decision": "block", "reason": text}


class Dialect:
    """label; events: our hook -> (the client's event name, its matcher or None); writers: tool name ->
    arguments -> the paths it writes; shells: tool name -> (the argument holding its shell command, the one
    naming the folder it runs in, relative to the session's, or None); deny:
    reason -> the answer that refuses the tool call; timeout_scale: the client's unit of a hook timeout, in
    seconds (1000: milliseconds); hand_over: text -> the Stop answer that hands it to the model and goes on.
    A plain class: `dataclasses` or `collections` would cost every hook run milliseconds to import."""
    __slots__ = ("label", "events", "writers", "shells", "deny", "timeout_scale", "hand_over")

    def __init__(self, label, events, writers, shells, deny, timeout_scale, hand_over=block_hand_over):
        self.label, self.events, self.writers, self.shells = label, events, writers, shells
        self.deny, self.timeout_scale, self.hand_over = deny, timeout_scale, hand_over

    def write_targets(self, tool: str, arguments: dict) -> list:
        """The files this file tool will write, as given (relative ones are the caller's to resolve)."""
        return self.writers[tool](arguments) if tool in self.writers else []

    def shell_command(self, tool: str, arguments: dict):
        """The command line of a shell tool's call (for shellwrites.write_targets), else None."""
        command = arguments.get(self.shells[tool][0]) if tool in self.shells else None
        return command if isinstance(command, str) else None

    def shell_folder(self, tool: str, arguments: dict, cwd: str) -> str:
        """The folder a shell tool's command runs in: the session's, or the one the call names below it."""
        folder = arguments.get(self.shells[tool][1]) if tool in self.shells and self.shells[tool][1] else None
        return os.path.join(cwd, folder) if isinstance(folder, str) and folder else cwd


def matcher(*tools) -> str:
    """A hook matcher (a regular expression) for exactly these tools; their names need no escaping."""
    assert all(t.isidentifier() for t in tools), tools
    return "^(" + "|".join(tools) + ")$"


CLAUDE_WRITERS = {"Edit": field("file_path"), "Write": field("file_path"), "NotebookEdit": field("notebook_path")}
CLAUDE_SHELLS = {"Bash": ("command", None), "Monitor": ("command", None)}     # Monitor runs its command in the background
CODEX_WRITERS = {"apply_patch": patch_paths}
CODEX_SHELLS = {"Bash": ("command", None)}      # its exec_command as its hooks name it: `cmd` becomes `command`,
                                                # the call's workdir the event's cwd (codex_real.py checks both)
GEMINI_WRITERS = {"write_file": field("file_path"), "replace": field("file_path")}
GEMINI_SHELLS = {"run_shell_command": ("command", "dir_path")}

CLIENTS = {
    "claude": Dialect("Claude Code", {},         # its hooks: install.HOOK_EVENTS and the plugin's hooks.json
                      CLAUDE_WRITERS, CLAUDE_SHELLS, permission_deny, 1, context_hand_over),
    "codex": Dialect("Codex CLI",
                     {"PreToolUse": ("PreToolUse", matcher(*CODEX_WRITERS, *CODEX_SHELLS)),
                      "PostToolUse": ("PostToolUse", matcher(*CODEX_SHELLS)),
                      "Stop": ("Stop", None), "SessionStart": ("SessionStart", None)},
                     CODEX_WRITERS, CODEX_SHELLS, permission_deny, 1),
    "gemini": Dialect("Gemini CLI",
                      {"PreToolUse": ("BeforeTool", matcher(*GEMINI_WRITERS, *GEMINI_SHELLS)),
                       "PostToolUse": ("AfterTool", matcher(*GEMINI_SHELLS)),
                       "Stop": ("AfterAgent", None), "SessionStart": ("SessionStart", None)},
                      GEMINI_WRITERS, GEMINI_SHELLS, decision_deny, 1000),
}
