"""Conformance: the real Gemini CLI (from npm) with our server and hooks, driven offline by a scripted stand-in
for the Gemini API (GOOGLE_GEMINI_BASE_URL on 127.0.0.1, API-key auth with a dummy key, streamed SSE).

    python3 tests/conformance/gemini_real.py GEMINI_BIN_DIR

A second session holds locked.txt. The model (our script) writes locked.txt with write_file, edits free.txt
with replace, lists the tasks, then ends its turn while a message waits. It must hold that: locked.txt is
unchanged and the model was shown our one-line reason; free.txt is edited and locked for the session; the tool
result reached the model as our text, not JSON; the waiting message reached it once, fenced; install.py --status
is right about the folder's trust (Gemini CLI agrees). Exits non-zero on any failed check.
"""
import json
import os
import subprocess
import sys

from realcli import FREE_TEXT, LOCKED_TEXT, MESSAGE, Scene, StandIn, around, fenced, occurrences, sse

PROMPT = "Update locked.txt and free.txt as planned, then stop."


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
            if turn == 1:
                answer = candidate(call("write_file", file_path=locked, content="overwritten by gemini\n"))
            elif turn == 2:
                answer = candidate(call("replace", file_path=free, old_string=FREE_TEXT.strip(),
                                        new_string="edited by gemini", instruction="edit the free file"))
            elif turn == 3:
                names = [d["name"] for t in body["tools"] for d in t.get("functionDeclarations", [])]
                answer = candidate(call(next((n for n in names if n.endswith("list_tasks")), "list_tasks")))
            elif turn == 4:
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
    standin = StandIn(script).start()
    try:
        os.makedirs(os.path.join(scene.home, ".gemini"), exist_ok=True)       # gemini --version made it
        with open(os.path.join(scene.home, ".gemini", "settings.json"), "w") as handle:
            json.dump({"security": {"auth": {"selectedType": "gemini-api-key"}}}, handle, indent=2)
        scene.env.update(GEMINI_API_KEY="dummy", GOOGLE_GEMINI_BASE_URL=f"http://127.0.0.1:{standin.port}")
        scene.run_install("--client", "gemini", "--hooks")
        status = scene.run_install("--status")
        scene.check("NOT RUNNING" in status and f"--client gemini --trust {scene.project}" in status,
                    "--status: an untrusted project folder is reported, with the fix")
        refused = run_gemini(timeout=120)
        scene.check(refused.returncode != 0 and "trusted" in (refused.stdout + refused.stderr)
                    and not any(is_main_loop(r) for r in standin.requests),
                    "Gemini CLI agrees: it will not work in that folder", (refused.stdout + refused.stderr)[-400:])
        scene.run_install("--client", "gemini", "--trust")
        scene.check("they will run in" in scene.run_install("--status"), "--status: trusted, the hooks will run")

        run = run_gemini()
        print(f"$ gemini -p ... (exit {run.returncode})\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        main_loop = [r for r in standin.requests if is_main_loop(r)]
        print(f"stand-in: {len(standin.requests)} requests, {len(main_loop)} of the main loop")
        for r in standin.requests:
            print(f"  {r['path']} {r.get('error', '')}")
        scene.check(run.returncode == 0, "gemini -p finished")
        scene.check(scene.read("locked.txt") == LOCKED_TEXT, "locked.txt is unchanged after the model's write_file")
        after_deny = json.dumps(main_loop[1]["body"]["contents"][-1]) if len(main_loop) > 1 else ""
        scene.check("locked.txt is locked by holder for \\\"release branch\\\"" in after_deny,
                    "the model was shown our one-line reason", after_deny[-600:])
        scene.check(scene.read("free.txt").strip() == "edited by gemini", "free.txt was edited (replace)")
        lock = seen.get("free.txt", {})
        scene.check(lock.get("holder") == seen.get("session") and lock.get("reason") == "auto: replace",
                    "free.txt is locked for the session (auto: replace)", str(lock))
        scene.check(occurrences(main_loop, MESSAGE) == 1, "the waiting message reached the model once",
                    f"{occurrences(main_loop, MESSAGE)} times in the last request")
        scene.check(fenced(main_loop, MESSAGE), "the message is fenced", around(main_loop, MESSAGE))
        shown = json.dumps(main_loop[3]["body"]["contents"][-1]) if len(main_loop) > 3 else ""
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
