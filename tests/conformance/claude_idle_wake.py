"""An idle interactive Claude Code session is woken, without a flag, by what concerns it (hook.py Wait).

    python3 tests/conformance/claude_idle_wake.py [--claude PATH] [--rounds N] [--keep]

The real CLI runs interactively under tmux (a private tmux server), offline against the scripted Messages API
stand-in, in a fresh HOME with onboarding and workspace trust pre-seeded and `install.py --hooks`. The session
finishes its turn and sits at its prompt; then another peer sends it a message over the HTTP API, and the stand-in
must receive a new request carrying that message, fenced, exactly once (and never again); the same for the human's
pause; a second session started with CTL_WAKE=never is not woken. `--rounds N` repeats the message wake N times
and prints the wake latency (send -> the model's new request at the stand-in), median and p99; `--idle-seconds S`
also measures the CPU an armed, idle waiting hook uses (bench/wake.py runs both). Prints "N passed, M failed" and exits 1 on any failure. Never touches the real ~/.claude*.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, CHECKOUT)

from messages_standin import StandIn, block_text, call, end  # noqa: E402
from claude_real import Checks, free_port  # noqa: E402
from ctl import common  # noqa: E402

DUMMY_KEY = "sk-ant-standin-dummy-key-0123456789abcdef"
FENCE = re.compile(r"<<<peer-text ([0-9a-f]{6,})\n(.*?)\npeer-text \1>>>", re.S)
ARM_LIMIT = 60              # seconds for a session to start, finish its first turn and arm its waiter
WAKE_LIMIT = 20             # seconds for a wake to reach the stand-in
QUIET_SECONDS = 6           # how long a session that must not wake is watched


class Harness:
    """A fresh HOME and git project, a broker, the stand-in, and interactive sessions in a private tmux server."""

    def __init__(self, claude: str, keep: bool):
        self.claude, self.keep = claude, keep
        self.tmp = tempfile.mkdtemp(prefix="ctl-idle-wake-")
        self.home = os.path.join(self.tmp, "home")
        self.project = os.path.join(self.tmp, "proj")
        os.makedirs(self.home)
        os.makedirs(self.project)
        self.state_dir = os.path.join(self.home, "state")
        self.port = free_port()
        self.tmux = ["tmux", "-L", f"ctl-wake-{os.getpid()}", "-f", "/dev/null"]
        self.standin = StandIn().start()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("CTL_", "ANTHROPIC_", "CLAUDE", "TMUX"))}
        self.env = {**clean, "HOME": self.home, "CTL_PORT": str(self.port), "CTL_STATE_DIR": self.state_dir,
                    "ANTHROPIC_API_KEY": DUMMY_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                    "DISABLE_AUTOUPDATER": "1", "TERM": "xterm-256color", "CTL_RATE_LIMIT": "1000"}

    def sh(self, *argv, cwd=None, timeout=120) -> str:
        done = subprocess.run(argv, cwd=cwd or self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def setup(self) -> str:
        self.sh("git", "init", "-q", self.project)
        self.sh(sys.executable, os.path.join(CHECKOUT, "install.py"), "--hooks")
        self.seed_onboarding()
        self.sh(sys.executable, os.path.join(CHECKOUT, "launch.py"), "--no-browser")
        return self.sh(self.claude, "--version").strip()

    def seed_onboarding(self) -> None:
        """What an interactive first start would ask, answered: onboarding, theme, the key, workspace trust."""
        path = os.path.join(self.home, ".claude.json")
        with open(path) as handle:
            config = json.load(handle)
        version = self.sh(self.claude, "--version").split()[0]
        config.update(hasCompletedOnboarding=True, lastOnboardingVersion=version, theme="dark",
                      customApiKeyResponses={"approved": [DUMMY_KEY[-20:]], "rejected": []})
        project = config.setdefault("projects", {}).setdefault(os.path.realpath(self.project), {})
        project.update(hasTrustDialogAccepted=True, hasCompletedProjectOnboarding=True)
        with open(path, "w") as handle:
            json.dump(config, handle)

    # -- the broker, as the operator and as another peer

    def client(self, token: str) -> common.BrokerClient:
        return common.BrokerClient(self.port, token=token, timeout=10,
                                   verify_key=common.read_secret(self.state_dir, common.HMAC_KEY_FILE))

    def operator(self, method: str, path: str, body=None):
        client = self.client(common.read_secret(self.state_dir, common.OPERATOR_TOKEN_FILE))
        try:
            status, rooms = client.request("GET", "/rooms")
            room = next(r["id"] for r in rooms["rooms"] if r["root"] == os.path.realpath(self.project) and not r["archived"])
            return client.request(method, path, {**(body or {}), "room": room})
        finally:
            client.close()

    def join(self, name: str) -> common.BrokerClient:
        client = self.client(common.read_secret(self.state_dir, common.JOIN_SECRET_FILE))
        status, joined = client.request("POST", "/join", {"name": name, "root": os.path.realpath(self.project)})
        if status != 200:
            raise RuntimeError(f"join {name}: {status} {joined}")
        client.token = joined["token"]
        return client

    # -- sessions

    def start(self, name: str, extra_env=None) -> None:
        """`claude` interactive in tmux window `name`, typing its first prompt once it is ready."""
        self.standin.script(name, [call("check"), end("Waiting for the team.")] + [end(f"Noted ({i}).") for i in range(80)])
        env = {**self.env, "ANTHROPIC_BASE_URL": self.standin.base_url(name), "CTL_NAME": name, **(extra_env or {})}
        wrapper = os.path.join(self.tmp, f"{name}.sh")
        with open(wrapper, "w") as handle:
            handle.write("#!/bin/sh\n" + "".join(f"export {k}={shell_quote(v)}\n" for k, v in env.items())
                         + f"cd {shell_quote(self.project)}\nexec {shell_quote(self.claude)} "
                           "--allowedTools mcp__ctl,ToolSearch\n")
        os.chmod(wrapper, 0o700)
        if subprocess.run(self.tmux + ["has-session"], capture_output=True).returncode == 0:
            self.sh(*self.tmux, "new-window", "-d", "-n", name, wrapper)
        else:
            self.sh(*self.tmux, "new-session", "-d", "-s", "wake", "-n", name, "-x", "160", "-y", "48", wrapper)
        deadline = time.monotonic() + ARM_LIMIT
        while "\u276f" not in self.screen(name):        # the input prompt's chevron
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up:\n{self.screen(name)}")
            time.sleep(0.5)
        time.sleep(1.0)
        self.sh(*self.tmux, "send-keys", "-t", f"wake:{name}", "-l", "Join the team, then wait for work.")
        time.sleep(0.3)
        self.sh(*self.tmux, "send-keys", "-t", f"wake:{name}", "Enter")

    def screen(self, name: str) -> str:
        done = subprocess.run(self.tmux + ["capture-pane", "-p", "-t", f"wake:{name}"], capture_output=True, text=True)
        return done.stdout

    def waiter_pid(self, name: str, previous=None):
        """The pid of the session's armed waiter (hook.py Wait), if one is armed and alive."""
        for entry in os.listdir(os.path.join(self.state_dir, "sessions")):
            if not entry.endswith(".wait"):
                continue
            binding = os.path.join(self.state_dir, "sessions", entry[:-len(".wait")] + ".json")
            try:
                with open(binding) as handle:
                    if json.load(handle).get("name") != name:
                        continue
                with open(os.path.join(self.state_dir, "sessions", entry)) as handle:
                    pid = int(handle.read().split("-")[0])
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if b"\0Wait" in handle.read() and pid != previous:
                        return pid
            except (OSError, ValueError):
                continue
        return None

    def idle(self, name: str, turns: int, previous=None) -> int:
        """Wait until the session has made `turns` main requests and its newest waiter is armed."""
        self.standin.wait_for(lambda log: len(self.standin.requests(name)) >= turns, ARM_LIMIT, f"{name}'s turn {turns}")
        deadline = time.monotonic() + ARM_LIMIT
        while True:
            pid = self.waiter_pid(name, previous)
            if pid is not None:
                time.sleep(0.5)                 # past its first look, into its long poll
                return pid
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} armed no waiter:\n{self.screen(name)}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(self.tmux + ["kill-server"], capture_output=True)
        if self.keep:
            with open(os.path.join(self.tmp, "requests.json"), "w") as handle:
                json.dump([{"session": r.session, "kind": r.kind, "body": r.body} for r in self.standin.requests(kind=None)],
                          handle)
            print(f"kept {self.tmp} (requests.json holds every request the CLI sent)")
        try:
            subprocess.run([sys.executable, os.path.join(CHECKOUT, "launch.py"), "--stop"], env=self.env,
                           capture_output=True, timeout=30)
        finally:
            self.standin.stop()
            if not self.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def new_text(before, after) -> str:
    """What a request adds to the conversation: its messages past the previous request's."""
    return "\n".join(block_text(m.get("content")) for m in after.messages()[len(before.messages()):])


def wake_on(harness: Harness, name: str, act, needle: str, label: str, checks: Checks, previous_pid=None):
    """Do `act` while the session is idle; check a new request arrives carrying `needle` once. Returns
    (latency, the waiter's pid)."""
    turns = len(harness.standin.requests(name))
    before = harness.standin.requests(name)[-1]
    started = time.monotonic()
    status, answer = act()
    if status != 200:
        checks.check(f"{label}: the broker took it", False, answer)
        return None
    try:
        harness.standin.wait_for(lambda log: len(harness.standin.requests(name)) > turns, WAKE_LIMIT, f"{label} wake")
    except TimeoutError:
        checks.check(f"{label}: the idle session is woken", False, harness.screen(name)[-600:])
        return None
    request = harness.standin.requests(name)[turns]
    latency = request.at - started
    added = new_text(before, request)
    checks.check(f"{label}: the idle session is woken with it ({latency * 1000:.0f} ms)", needle in added, added[:400])
    checks.check(f"{label}: carried exactly once", request.transcript().count(needle) == 1,
                 f"{request.transcript().count(needle)} copies")
    return latency


def scenario(harness: Harness, rounds: int, idle_seconds: float, checks: Checks) -> dict:
    version = harness.setup()
    print(f"Claude Code under test: {version}")
    harness.start("idle")
    pid = harness.idle("idle", 2)
    sender = harness.join("sender")
    latencies = []
    idle_cpu = None
    for i in range(max(1, rounds)):
        if i == 1 and idle_seconds:             # the CPU an armed, idle waiter costs, per minute
            spent = cpu_seconds(pid)
            time.sleep(idle_seconds)
            idle_cpu = (cpu_seconds(pid) - spent) * 60 / idle_seconds
        text = f"Please review the parser, round {i}."
        latency = wake_on(harness, "idle", lambda: sender.request("POST", "/messages", {"to": "idle", "content": text}),
                          text, f"message {i}", checks)
        if latency is None:
            break
        latencies.append(latency)
        request = harness.standin.requests("idle")[-1]
        fenced = [m.group(2) for m in FENCE.finditer(request.transcript())]
        checks.check(f"message {i}: fenced, with its provenance",
                     text in fenced and re.search(r"#\d+ from sender \(worker, agent\) to idle", request.transcript())
                     is not None, new_text(harness.standin.requests("idle")[-2], request)[:400])
        pid = harness.idle("idle", len(harness.standin.requests("idle")), previous=pid)
    later = harness.standin.requests("idle")
    checks.check("no message handed over again by a later turn (Stop, check)",
                 bool(latencies) and all(later[-1].transcript().count(f"round {i}.") == 1 for i in range(len(latencies))))
    wake_on(harness, "idle", lambda: harness.operator("POST", "/operator/pause"), "PAUSED", "the human's pause", checks)
    harness.idle("idle", len(harness.standin.requests("idle")), previous=pid)
    harness.operator("POST", "/operator/resume")

    harness.start("quiet", {"CTL_WAKE": "never"})
    harness.standin.wait_for(lambda log: len(harness.standin.requests("quiet")) >= 2, ARM_LIMIT, "quiet's first turn")
    time.sleep(2)
    turns = len(harness.standin.requests("quiet"))
    status, sent = sender.request("POST", "/messages", {"to": "quiet", "content": "Nobody wakes you."})
    checks.check("CTL_WAKE=never: a message waits for the quiet session", status == 200 and
                 sent.get("delivered_to") == ["quiet"], f"{status} {sent}")
    time.sleep(QUIET_SECONDS)
    checks.check("CTL_WAKE=never: the idle session is not woken", len(harness.standin.requests("quiet")) == turns,
                 harness.screen("quiet")[-400:])
    checks.check("CTL_WAKE=never: no waiter runs", harness.waiter_pid("quiet") is None)
    sender.close()
    return {"version": version, "latencies": latencies, "idle_cpu_per_minute": idle_cpu}


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has run, to the nanosecond (the scheduler's count, finer than clock ticks)."""
    with open(f"/proc/{pid}/schedstat") as handle:
        return int(handle.read().split()[0]) / 1e9


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claude", default=shutil.which("claude") or "/opt/cc/node_modules/.bin/claude")
    parser.add_argument("--rounds", type=int, default=1, help="message wakes to time (the bench uses 20)")
    parser.add_argument("--idle-seconds", type=float, default=0,
                        help="with --rounds > 1: also measure an idle waiter's CPU over this long")
    parser.add_argument("--keep", action="store_true", help="keep the temporary HOME and every request the CLI sent")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args(argv)
    checks = Checks()
    harness = Harness(args.claude, args.keep)
    try:
        result = scenario(harness, args.rounds, args.idle_seconds, checks)
    except (RuntimeError, TimeoutError) as exc:
        checks.check("the scenario ran to its end", False, str(exc)[-1500:])
        result = {}
    finally:
        harness.close()
    latencies = result.get("latencies") or []
    if len(latencies) > 1:
        print(f"idle wake latency over {len(latencies)} wakes: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms")
    if result.get("idle_cpu_per_minute") is not None:
        print(f"an idle waiting hook's CPU: {result['idle_cpu_per_minute'] * 1000:.2f} ms per minute")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle)
    passed, failed = checks.summary()
    print(f"Claude Code idle wake: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
