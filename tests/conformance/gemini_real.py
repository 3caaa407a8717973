"""Conformance: the real Gemini CLI (from npm) with our server and hooks, driven offline by a scripted stand-in
for the Gemini API (GOOGLE_GEMINI_BASE_URL on 127.0.0.1, API-key auth with a dummy key, streamed SSE).

    python3 tests/conformance/gemini_real.py GEMINI_BIN_DIR

A second session holds locked.txt. The model (our script) writes locked.txt with write_file; then through
run_shell_command (a redirection and `sed -i`, which the BeforeTool hook reads); reads it (`cat`); writes it with
two Python one-liners the hook cannot read (the second then fails); writes `../locked.txt` and `locked.txt` from
the dir_path `sub`; edits free.txt with replace; lists the tasks; then ends its turn while a message waits. It
must hold that: locked.txt is unchanged by write_file and the named shell writes, and the model was shown our
one-line reason each time; the read and the free file in sub/ ran; each unseen write ran, the model was told right
after it which file, whose lock and what to do, the human sees a lock_violation and the holder a message; free.txt
is edited and locked for the session; the tool result reached the model as our text, not JSON; the waiting
message reached it once, fenced; hook timeouts are milliseconds; install.py --status is right about the folder's
trust (Gemini CLI agrees). Exits non-zero on any failed check.
"""
import json
import os
import subprocess
import sys

from realcli import (FREE_TEXT, LOCKED_TEXT, MESSAGE, SHELL_DENIED, SHELL_IN_SUB, SHELL_READ, Scene, StandIn,
                     around, fenced, occurrences, sse, unseen_shell_writes)

PROMPT = "Update locked.txt and free.txt as planned, then stop."
SHELL_UNSEEN, STAMPED = unseen_shell_writes("gemini")
SHELL_REPORT = "changed during your run_shell_command call"


def instance(schema: dict):
    """A value fitting a response schema (the CLI's side questions, such as its model router's, want JSON)."""
    kind = str(schema.get("type", "object")).lower()
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        return {name: instance(sub) for name, sub in (schema.get("properties") or {}).items()}
    return {"string": "simple", "integer": 1, "number": 1, "boolean": False, "array": []}.get(kind)


def candidate(*parts) -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": list(parts)}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}}


def call(name: str, **args) -> dict:
    return {"functionCall": {"name": name, "args": args}}


def shown_for(main_loop: list, turn: int) -> str:
    """What the model was shown for the call it made in answer to main-loop request `turn` (1-based): the last
    content of the next request, whose function response and whatever a hook added to it."""
    return json.dumps(main_loop[turn]["body"]["contents"][-1], ensure_ascii=False) if len(main_loop) > turn else ""


def is_main_loop(request) -> bool:
    return isinstance(request["body"], dict) and bool(request["body"].get("tools"))


def main(cli_bin: str) -> int:
    gemini = os.path.join(cli_bin, "gemini")
    scene = Scene("gemini", cli_bin)
    version = subprocess.run([gemini, "--version"], env=scene.env, capture_output=True, text=True, timeout=120)
    print(f"Gemini CLI: {version.stdout.strip()}")
    locked, free = os.path.join(scene.project, "locked.txt"), os.path.join(scene.project, "free.txt")

    def script(request):
        body, path = request["body"], request["path"]
        if ":countTokens" in path:
            return "application/json", json.dumps({"totalTokens": 10}).encode()
        if not is_main_loop(request):
            config = body.get("generationConfig", {}) if isinstance(body, dict) else {}
            schema = config.get("responseJsonSchema") or config.get("responseSchema")
            answer = candidate({"text": json.dumps(instance(schema)) if schema else "ok"})
        else:
            turn = sum(1 for r in standin.requests if is_main_loop(r))
            if turn == 2:                               # write_file was answered: the file as it left it
                seen["after_write_file"] = scene.read("locked.txt")
            if turn - 2 == len(SHELL_DENIED):           # the named shell writes are done: the file as they left it
                seen["after_denied"] = scene.read("locked.txt")
            if turn == 1:
                answer = candidate(call("write_file", file_path=locked, content="overwritten by gemini\n"))
            elif turn - 2 < len(shells):
                answer = candidate(call("run_shell_command", **shells[turn - 2]))
            elif turn - len(shells) == 2:
                answer = candidate(call("replace", file_path=free, old_string=FREE_TEXT.strip(),
                                        new_string="edited by gemini", instruction="edit the free file"))
            elif turn - len(shells) == 3:
                names = [d["name"] for t in body["tools"] for d in t.get("functionDeclarations", [])]
                answer = candidate(call(next((n for n in names if n.endswith("list_tasks")), "list_tasks")))
            elif turn - len(shells) == 4:
                seen.update(scene.locks(), session=scene.peers()[0])   # while it lives: its auto locks go with it
                scene.holder.ok("POST", "/messages", {"to": scene.peers()[0], "content": MESSAGE})
                answer = candidate({"text": "Both files handled."})
            else:
                answer = candidate({"text": "Noted the message."})
        if "alt=sse" in path:
            return "text/event-stream", sse([(None, answer)])
        return "application/json", json.dumps(answer).encode()

    def run_gemini(timeout=240):
        return subprocess.run([gemini, "-p", PROMPT, "--yolo", "--output-format", "text"], env=scene.env,
                              cwd=scene.project, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    seen = {}                                           # the locks and the session's name, seen mid-turn
    shells = [{"command": command} for command in (*SHELL_DENIED, SHELL_READ, *SHELL_UNSEEN)]
    shells += [{"command": command, "dir_path": "sub"} for command in SHELL_IN_SUB]
    os.makedirs(os.path.join(scene.project, "sub"))
    scene.write("sub/locked.txt", "another file of the same name\n")
    standin = StandIn(script).start()
    try:
        os.makedirs(os.path.join(scene.home, ".gemini"), exist_ok=True)       # gemini --version made it
        with open(os.path.join(scene.home, ".gemini", "settings.json"), "w") as handle:
            json.dump({"security": {"auth": {"selectedType": "gemini-api-key"}}}, handle, indent=2)
        scene.env.update(GEMINI_API_KEY="dummy", GOOGLE_GEMINI_BASE_URL=f"http://127.0.0.1:{standin.port}")
        scene.run_install("--client", "gemini", "--hooks")
        with open(os.path.join(scene.home, ".gemini", "settings.json")) as handle:
            timeouts = {hook.get("timeout") for groups in json.load(handle)["hooks"].values()
                        for group in groups for hook in group["hooks"]}
        scene.check(timeouts == {10000}, "the hooks' timeouts are written in milliseconds (10000)", str(timeouts))
        status = scene.run_install("--status")
        scene.check("NOT RUNNING" in status and f"--client gemini --trust {scene.project}" in status,
                    "--status: an untrusted project folder is reported, with the fix")
        scene.check("answers (" in status and "but Gemini CLI shows it Disabled here" in status,
                    "--status: the server answers but Gemini CLI shows it Disabled in that folder", status)
        refused = run_gemini(timeout=120)
        scene.check(refused.returncode != 0 and "trusted" in (refused.stdout + refused.stderr)
                    and not any(is_main_loop(r) for r in standin.requests),
                    "Gemini CLI agrees: it will not work in that folder", (refused.stdout + refused.stderr)[-400:])
        scene.run_install("--client", "gemini", "--trust")
        status = scene.run_install("--status")
        scene.check("they will run in" in status and "Disabled" not in status,
                    "--status: trusted, the server is enabled and the hooks will run", status)

        run = run_gemini()
        print(f"$ gemini -p ... (exit {run.returncode})\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        main_loop = [r for r in standin.requests if is_main_loop(r)]
        print(f"stand-in: {len(standin.requests)} requests, {len(main_loop)} of the main loop")
        for r in standin.requests:
            print(f"  {r['path']} {r.get('error', '')}")
        scene.check(run.returncode == 0, "gemini -p finished")
        scene.check(seen.get("after_write_file") == LOCKED_TEXT, "locked.txt is unchanged after the model's write_file",
                    repr(seen.get("after_write_file")))
        after_deny = shown_for(main_loop, 1)
        scene.check("locked.txt is locked by holder for \\\"release branch\\\"" in after_deny,
                    "the model was shown our one-line reason", after_deny[-600:])
        names = [d["name"] for t in main_loop[0]["body"]["tools"] for d in t.get("functionDeclarations", [])]
        scene.check("run_shell_command" in names, "Gemini CLI offers the model its shell tool, run_shell_command")
        for nth, command in enumerate(SHELL_DENIED):
            shown = shown_for(main_loop, 2 + nth)
            scene.check(shown.count('locked.txt is locked by holder for \\"release branch\\" since ') == 1
                        and "Do not edit it: message holder (send) to coordinate, or take another task." in shown,
                        f"the shell write `{command}` is denied with our one-line reason", shown[:600])
        scene.check(seen.get("after_denied") == LOCKED_TEXT, "locked.txt is unchanged after the denied shell writes",
                    repr(seen.get("after_denied")))
        shown = shown_for(main_loop, 2 + len(SHELL_DENIED))
        scene.check(LOCKED_TEXT.strip() in shown and "locked by" not in shown, f"the read `{SHELL_READ}` runs", shown[:600])
        for nth, (command, denied) in enumerate(SHELL_IN_SUB.items()):
            shown = shown_for(main_loop, 2 + len(shells) - len(SHELL_IN_SUB) + nth)
            scene.check(("locked.txt is locked by holder" in shown) == denied,
                        f"`{command}` in the folder the call names (dir_path sub) is {'denied' if denied else 'run'}",
                        shown[:400])
        scene.check(scene.read("sub/locked.txt") == "sub\n", "sub/locked.txt, a free file, was written")
        for nth, code in enumerate(SHELL_UNSEEN.values()):
            report = shown_for(main_loop, 3 + len(SHELL_DENIED) + nth)
            print(f"the model was told after the unseen write (exit {code}): {report[:700]!r}")
            scene.check("Output: (empty)" in report and ("Exit Code: 3" in report if code else "Exit Code" not in report)
                        and "blocked" not in report, f"the unseen write runs (exit {code})", report[:600])
            scene.check(SHELL_REPORT in report and "locked.txt is locked by holder" in report and "restore it" in report
                        and "message holder (send)" in report,
                        f"right after it (exit {code}) the model is told which file, whose lock, what to do",
                        report[-1500:])
        scene.check_unseen_writes_reported(json.dumps(main_loop[-1]["body"], ensure_ascii=False), SHELL_REPORT,
                                           len(SHELL_UNSEEN), STAMPED, seen.get("session"))
        scene.check(scene.read("free.txt").strip() == "edited by gemini", "free.txt was edited (replace)")
        lock = seen.get("free.txt", {})
        scene.check(lock.get("holder") == seen.get("session") and lock.get("reason") == "auto: replace",
                    "free.txt is locked for the session (auto: replace)", str(lock))
        scene.check(occurrences(main_loop, MESSAGE) == 1, "the waiting message reached the model once",
                    f"{occurrences(main_loop, MESSAGE)} times in the last request")
        scene.check(fenced(main_loop, MESSAGE), "the message is fenced", around(main_loop, MESSAGE))
        shown = shown_for(main_loop, 3 + len(shells))
        print(f"the model saw for list_tasks: {shown[:300]}")
        scene.check("No open tasks" in shown and '{\\"' not in shown.replace('{"', ""),
                    "a tool result reaches the model as our text, not JSON", shown[:400])
        first = json.dumps(main_loop[0]["body"]) if main_loop else ""
        scene.check("Control Tower Lite: you are" in first, "the SessionStart briefing reached the model")
        settings = os.path.join(scene.home, ".gemini", "settings.json")
        with open(settings) as handle:
            before_uninstall = handle.read()
        scene.run_install("--client", "gemini", "--uninstall")
        with open(settings) as handle:
            left = handle.read()
        scene.check("hook.py" not in left and "hook.py" in before_uninstall, "--uninstall removed our hooks", left)
    finally:
        standin.stop()
    return scene.finish("Gemini CLI stage")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
