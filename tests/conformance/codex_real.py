"""Conformance: the real Codex CLI (from npm) with our server and hooks, driven offline by a scripted stand-in
for the OpenAI Responses API (a custom model provider on 127.0.0.1, streamed server-sent events).

    python3 tests/conformance/codex_real.py CODEX_BIN_DIR

A second session holds locked.txt. The model (our script) patches locked.txt; writes it through the shell
(exec_command: a redirection and `sed -i`, which the PreToolUse hook reads); reads it (`cat`); writes it with two
Python one-liners the hook cannot read (the second then fails); writes `../locked.txt` and `locked.txt` from the
workdir `sub`; patches free.txt; lists the tasks (finding the tool through Codex's tool search); then ends its
turn while a message waits. It must hold that: locked.txt is unchanged by the patch and the named shell writes,
and the model was shown our one-line reason each time; the read and the free file in sub/ ran; each unseen write
ran, the model was told right after it which file, whose lock and what to do, the human sees a lock_violation and
the holder a message; free.txt is edited and locked for the session; the tool result reached the model as our
text, not JSON; the waiting message reached it once, fenced; install.py trusts exactly our hooks and --status is
right about that trust. Exits non-zero on a failed check.
"""
import itertools
import json
import os
import subprocess
import sys

from realcli import (FREE_TEXT, LOCKED_TEXT, MESSAGE, SHELL_DENIED, SHELL_IN_SUB, SHELL_READ, Scene, StandIn,
                     around, fenced, occurrences, sse, unseen_shell_writes)

PROMPT = "Update locked.txt and free.txt as planned, then stop."
SHELL_UNSEEN, STAMPED = unseen_shell_writes("codex")
SHELL_REPORT = "changed during your Bash call"
_ids = itertools.count(1)


def patch(name: str, old: str, new: str) -> str:
    return f"*** Begin Patch\n*** Update File: {name}\n@@\n-{old.rstrip()}\n+{new}\n*** End Patch\n"


def response(*items) -> tuple:
    """One streamed Responses API answer holding these output items."""
    rid = f"resp_{next(_ids)}"
    events = [("response.created", {"type": "response.created", "response": {"id": rid}})]
    events += [("response.output_item.done", {"type": "response.output_item.done", "output_index": i, "item": item})
               for i, item in enumerate(items)]
    events.append(("response.completed", {"type": "response.completed", "response": {
        "id": rid, "usage": {"input_tokens": 10, "input_tokens_details": None, "output_tokens": 5,
                             "output_tokens_details": None, "total_tokens": 15}}}))
    return "text/event-stream", sse(events)


def apply_patch(text: str) -> dict:
    n = next(_ids)
    return {"type": "custom_tool_call", "id": f"ctc_{n}", "call_id": f"call_{n}", "name": "apply_patch",
            "input": text, "status": "completed"}


def shell(command: str, **more) -> dict:
    """Codex's shell tool, exec_command (its hooks call it Bash, with `cmd` as `command`)."""
    n = next(_ids)
    return {"type": "function_call", "id": f"fc_{n}", "call_id": f"shell_{n}", "name": "exec_command",
            "arguments": json.dumps({"cmd": command, **more})}


def call_output(requests: list, call_id: str):
    """(what the model was shown for this call, everything the first request that showed it placed between the
    call and its output: what a hook added)."""
    for request in requests:
        items = request["body"]["input"]
        ends = [n for n, item in enumerate(items) if item.get("call_id") == call_id]
        if len(ends) > 1 and items[ends[-1]].get("type", "").endswith("call_output"):
            return (json.dumps(items[ends[-1]].get("output"), ensure_ascii=False),
                    json.dumps(items[ends[0] + 1:ends[-1]], ensure_ascii=False))
    return "", ""


def say(text: str) -> dict:
    return {"type": "message", "role": "assistant", "id": f"msg_{next(_ids)}",
            "content": [{"type": "output_text", "text": text}]}


def patch_model(codex: str, env: dict) -> str:
    """A model Codex gives the freeform apply_patch tool among plain function tools (its catalog ships with the
    CLI; a code-mode model would hide the tools behind a script runner)."""
    listing = subprocess.run([codex, "debug", "models"], env=env, capture_output=True, text=True, timeout=60)
    models = json.loads(listing.stdout)
    models = models.get("models", models) if isinstance(models, dict) else models
    found = next((m["slug"] for m in models if m.get("apply_patch_tool_type") == "freeform"
                  and not m.get("tool_mode") and not m.get("use_responses_lite")), None)   # plain tools, full API
    if found is None:
        raise SystemExit("FAILED: no model in codex's catalog has the apply_patch tool")
    return found


def main(cli_bin: str) -> int:
    codex = os.path.join(cli_bin, "codex")
    scene = Scene("codex", cli_bin)
    version = subprocess.run([codex, "--version"], env=scene.env, capture_output=True, text=True, timeout=60)
    print(f"Codex CLI: {version.stdout.strip()}")

    def script(request):
        body = request["body"]
        if not isinstance(body, dict) or "tools" not in body:
            return response(say("ok"))                  # not the main loop (a title, a summary): a short text
        turn = sum(1 for r in standin.requests if isinstance(r["body"], dict) and "tools" in r["body"])
        if turn == 1:
            return response(apply_patch(patch("locked.txt", LOCKED_TEXT, "overwritten by codex")))
        if turn - 2 < len(shells):
            if turn == 2:                               # the patch was answered: the file as it left it
                seen["after_patch"] = scene.read("locked.txt")
            if turn - 2 == len(SHELL_DENIED):           # the named writes are done: the file as they left it
                seen["after_denied"] = scene.read("locked.txt")
            return response(shells[turn - 2])
        turn -= len(shells)
        if turn == 2:
            return response(apply_patch(patch("free.txt", FREE_TEXT, "edited by codex")))
        if turn == 3:                                   # Codex defers MCP tools behind its client-side search
            return response({"type": "tool_search_call", "call_id": "search_1", "execution": "client",
                             "arguments": {"query": "list_tasks"}, "status": "completed"})
        if turn == 4:
            found = next((t["name"] for t in body["input"][-1].get("tools", []) if t.get("type") == "namespace"), "")
            return response({"type": "function_call", "id": "fc_list", "call_id": "call_list", "name": "list_tasks",
                             "namespace": found, "arguments": "{}"})
        if turn == 5:
            seen.update(scene.locks(), session=scene.peers()[0])   # while it lives: its auto locks go with it
            session = scene.peers()[0]
            scene.holder.ok("POST", "/messages", {"to": session, "content": MESSAGE})
            return response(say("Both files handled."))
        return response(say("Noted the message."))

    seen = {}                                           # the locks and the session's name, seen mid-turn
    shells = [shell(command) for command in (*SHELL_DENIED, SHELL_READ, *SHELL_UNSEEN)]
    shells += [shell(command, workdir="sub") for command in SHELL_IN_SUB]
    os.makedirs(os.path.join(scene.project, "sub"))
    scene.write("sub/locked.txt", "another file of the same name\n")
    standin = StandIn(script).start()
    try:
        os.makedirs(os.path.join(scene.home, ".codex"))
        with open(os.path.join(scene.home, ".codex", "config.toml"), "w") as handle:
            handle.write(f'model = "{patch_model(codex, scene.env)}"\nmodel_provider = "standin"\n\n'
                         f'[model_providers.standin]\nname = "standin"\n'
                         f'base_url = "http://127.0.0.1:{standin.port}/v1"\nwire_api = "responses"\n'
                         f'env_key = "STANDIN_API_KEY"\n\n'
                         '[features]\nenable_request_compression = false\n\n')   # plain JSON bodies to read
        scene.env["STANDIN_API_KEY"] = "dummy"
        planted = os.path.join(scene.project, ".codex", "hooks.json")    # a cloned repository's own hook
        os.makedirs(os.path.dirname(planted))
        with open(planted, "w") as handle:
            json.dump({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": "touch pwned # hook.py"}]}]}},
                      handle)
        scene.run_install("--client", "codex", "--hooks")
        with open(os.path.join(scene.home, ".codex", "config.toml")) as handle:
            config = handle.read()
        hooks_file = os.path.join(scene.home, ".codex", "hooks.json")
        with open(hooks_file) as handle:
            ours = sum(len(group["hooks"]) for groups in json.load(handle)["hooks"].values() for group in groups)
        scene.check(ours >= 3 and config.count("trusted_hash") == ours and planted not in config,
                    f"install trusts exactly our {ours} hooks, never a project's look-alike", config)
        status = scene.run_install("--status")
        scene.check(f"trusted by Codex: {ours} hooks will run" in status, "--status: the hooks are trusted and will run",
                    status)
        with open(hooks_file) as handle:
            pristine = handle.read()
        with open(hooks_file, "w") as handle:
            handle.write(pristine.replace('"timeout": 10', '"timeout": 11', 1))
        status = scene.run_install("--status")
        scene.check("NOT RUNNING: Codex skips hooks it has not trusted (modified)" in status,
                    "--status: a changed hook is reported as not running, with the fix")
        scene.run_install("--client", "codex", "--hooks")      # the fix it names
        scene.check("will run" in scene.run_install("--status"), "--status: trusted again after the fix")

        run = subprocess.run([codex, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
                              "-C", scene.project, PROMPT], env=scene.env, cwd=scene.project,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
        print(f"$ codex exec ... (exit {run.returncode})\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        main_loop = [r for r in standin.requests if isinstance(r["body"], dict) and "tools" in r["body"]]
        print(f"stand-in: {len(standin.requests)} requests, {len(main_loop)} of the main loop")
        for r in standin.requests:
            shape = sorted(r["body"])[:12] if isinstance(r["body"], dict) else f"{str(r['body'])[:60]!r}"
            print(f"  {r['path']} {shape} {r.get('error', '')}")
        scene.check(run.returncode == 0, "codex exec finished")
        scene.check(seen.get("after_patch") == LOCKED_TEXT, "locked.txt is unchanged after the model's patch",
                    repr(seen.get("after_patch")))
        after_deny = json.dumps(main_loop[1]["body"]) if len(main_loop) > 1 else ""
        scene.check("locked.txt is locked by holder for \\\"release branch\\\"" in after_deny,
                    "the model was shown our one-line reason", after_deny[-600:])
        shell_tool = next((t["name"] for t in main_loop[0]["body"]["tools"] if t.get("name") == "exec_command"), None)
        scene.check(shell_tool == "exec_command", "Codex offers the model its shell tool, exec_command")
        for command, asked in zip(SHELL_DENIED, shells):
            shown, _ = call_output(main_loop, asked["call_id"])
            scene.check(shown.count("locked.txt is locked by holder for \\\"release branch\\\" since ") == 1
                        and "Do not edit it: message holder (send) to coordinate, or take another task." in shown,
                        f"the shell write `{command}` is denied with our one-line reason", shown[:600])
        scene.check(seen.get("after_denied") == LOCKED_TEXT, "locked.txt is unchanged after the denied shell writes",
                    repr(seen.get("after_denied")))
        shown, _ = call_output(main_loop, shells[len(SHELL_DENIED)]["call_id"])
        scene.check(LOCKED_TEXT.strip() in shown and "locked by" not in shown, f"the read `{SHELL_READ}` runs", shown[:600])
        for (command, denied), asked in zip(SHELL_IN_SUB.items(), shells[-len(SHELL_IN_SUB):]):
            shown, _ = call_output(main_loop, asked["call_id"])
            scene.check(("locked.txt is locked by holder" in shown) == denied,
                        f"`{command}` in the folder the call names (workdir sub) is {'denied' if denied else 'run'}",
                        shown[:400])
        scene.check(scene.read("sub/locked.txt") == "sub\n", "sub/locked.txt, a free file, was written")
        unseen_at = len(SHELL_DENIED) + 1
        for (command, code), asked in zip(SHELL_UNSEEN.items(), shells[unseen_at:]):
            shown, added = call_output(main_loop, asked["call_id"])
            scene.check(f"Process exited with code {code}" in shown and "blocked" not in shown.lower(),
                        f"the unseen write runs (exit {code})", shown[:600])
            print(f"the model was told after the unseen write (exit {code}): {added[:500]!r}")
            scene.check(SHELL_REPORT in added and "locked.txt is locked by holder" in added and "restore it" in added
                        and "message holder (send)" in added,
                        f"right after it (exit {code}) the model is told which file, whose lock, what to do", added[-1500:])
        scene.check_unseen_writes_reported(json.dumps(main_loop[-1]["body"], ensure_ascii=False), SHELL_REPORT,
                                           len(SHELL_UNSEEN), STAMPED, seen.get("session"))
        scene.check(scene.read("free.txt").strip() == "edited by codex", "free.txt was edited")
        lock = seen.get("free.txt", {})
        scene.check(lock.get("holder") == seen.get("session") and lock.get("reason") == "auto: apply_patch",
                    "free.txt is locked for the session (auto: apply_patch)", str(lock))
        scene.check(occurrences(main_loop, MESSAGE) == 1, "the waiting message reached the model once",
                    f"{occurrences(main_loop, MESSAGE)} times in the last request")
        scene.check(fenced(main_loop, MESSAGE), "the message is fenced", around(main_loop, MESSAGE))
        listed = [item for r in main_loop for item in r["body"]["input"]
                  if item.get("type") == "function_call_output" and item.get("call_id") == "call_list"][:1]
        shown = json.dumps(listed[0]["output"]) if listed else ""
        print(f"the model saw for list_tasks: {shown[:300]}")
        scene.check("No open tasks" in shown and '{\\"' not in shown,
                    "a tool result reaches the model as our text, not JSON", shown[:400])
        first = json.dumps(main_loop[0]["body"]) if main_loop else ""
        scene.check("Control Tower Lite: you are" in first, "the SessionStart briefing reached the model")
        scene.run_install("--client", "codex", "--uninstall")
        left = open(hooks_file).read() if os.path.exists(hooks_file) else ""
        scene.check("hook.py" not in left, "--uninstall removed our hooks", left)
    finally:
        standin.stop()
    return scene.finish("Codex CLI stage")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
