"""install.py against a temporary HOME, and launch.py starting, reporting and stopping a real broker."""
import difflib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from helpers import ROOT, BrokerProcess, ctl_common, free_port
from ctl import dashboard  # noqa: E402  (helpers puts the checkout on the path)
from ctl.errors import ApiError  # noqa: E402

INSTALL = os.path.join(ROOT, "install.py")
LAUNCH = os.path.join(ROOT, "launch.py")
MCP = os.path.join(ROOT, "mcp_server.py")


def count_messages(path: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        db.close()


class InstallTest(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="ctl-home-")
        self.env = {**os.environ, "HOME": self.home, "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}
        self.assertIsNone(shutil.which("claude", path=self.env["PATH"]), "these tests edit files, not the CLI")

    def tearDown(self):
        shutil.rmtree(self.home, ignore_errors=True)

    def run_install(self, *args, cwd=None):
        return subprocess.run([sys.executable, INSTALL, *args], env=self.env, cwd=cwd or self.home,
                              capture_output=True, text=True, timeout=60)

    def read_json(self, *parts):
        with open(os.path.join(self.home, *parts)) as handle:
            return json.load(handle)

    def snapshot(self, *folders):
        """Every file under the folders, with its bytes: what "leaves nothing behind" compares."""
        found = {}
        for folder in folders:
            for top, dirs, files in os.walk(folder):
                for name in dirs:
                    found[os.path.join(top, name) + "/"] = None
                for name in files:
                    with open(os.path.join(top, name), "rb") as handle:
                        found[os.path.join(top, name)] = handle.read()
        return found

    def test_fresh_file_second_run_and_uninstall(self):
        before = self.snapshot(self.home)
        result = self.run_install()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("registered in", result.stdout)
        entry = self.read_json(".claude.json")["mcpServers"]["ctl"]
        self.assertEqual((entry["type"], entry["command"], entry["args"]), ("stdio", sys.executable, ["-S", MCP]))
        stamp = os.stat(os.path.join(self.home, ".claude.json")).st_mtime_ns
        again = self.run_install()
        self.assertIn("nothing changed", again.stdout)
        self.assertEqual(os.stat(os.path.join(self.home, ".claude.json")).st_mtime_ns, stamp)
        removed = self.run_install("--uninstall")
        self.assertIn("removed", removed.stdout)
        self.assertEqual(self.snapshot(self.home), before, "a file install created is gone again, no backups left")

    def test_existing_file_keeps_its_layout_and_comes_back_byte_identical(self):
        original = json.dumps({"theme": "dark", "projects": {"/x": {"allowedTools": []}},
                               "mcpServers": {"other": {"command": "other-server"}}}, indent=4)
        with open(os.path.join(self.home, ".claude.json"), "w") as handle:
            handle.write(original)
        before = self.snapshot(self.home)
        self.assertEqual(self.run_install("--port", "7999").returncode, 0)
        data = self.read_json(".claude.json")
        self.assertEqual(data["theme"], "dark")
        self.assertEqual(data["mcpServers"]["other"], {"command": "other-server"})
        self.assertEqual(data["mcpServers"]["ctl"]["args"], ["-S", MCP, "--port", "7999"])
        with open(os.path.join(self.home, ".claude.json")) as handle:
            self.assertIn('\n    "theme": "dark"', handle.read(), "the file keeps its own indentation")
        self.assertEqual([p for p in os.listdir(self.home) if "backup" in p], [])
        self.run_install("--uninstall")
        self.assertEqual(self.snapshot(self.home), before)

    def test_ctl_port_is_recorded(self):
        self.env["CTL_PORT"] = "7555"
        self.run_install()
        self.assertEqual(self.read_json(".claude.json")["mcpServers"]["ctl"]["args"], ["-S", MCP, "--port", "7555"])

    def test_malformed_file_is_never_overwritten(self):
        path = os.path.join(self.home, ".claude.json")
        with open(path, "w") as handle:
            handle.write('{"theme": "dark",,}')
        result = self.run_install()
        self.assertEqual(result.returncode, 1)
        self.assertIn("not valid JSON", result.stderr)
        with open(path) as handle:
            self.assertEqual(handle.read(), '{"theme": "dark",,}')

    def test_unwritable_target_fails_with_a_reason(self):
        blocker = os.path.join(self.home, "a-file")
        open(blocker, "w").close()
        result = self.run_install("--scope", "project", os.path.join(blocker, "proj"))
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"cannot (read|write) .*a-file")
        self.assertNotIn("Traceback", result.stderr)

    def test_a_reader_that_stops_early_is_no_error(self):
        piped = subprocess.run(f"'{sys.executable}' '{INSTALL}' --print --hooks | head -1", shell=True, env=self.env,
                               cwd=self.home, capture_output=True, text=True, timeout=60)
        self.assertEqual(piped.stderr, "")

    def test_project_scope_is_portable_and_minimal(self):
        project = os.path.join(self.home, "proj")
        os.makedirs(project)
        existing = '{\n  "mcpServers": {\n    "db": {\n      "command": "db-mcp"\n    }\n  }\n}\n'
        with open(os.path.join(project, ".mcp.json"), "w") as handle:
            handle.write(existing)
        before = self.snapshot(self.home)
        self.env.update(CTL_PORT="7999", CTL_STATE_DIR=os.path.join(self.home, "mine"))
        self.assertEqual(self.run_install("--scope", "project", project).returncode, 0)
        with open(os.path.join(project, ".mcp.json")) as handle:
            written = handle.read()
        entry = json.loads(written)["mcpServers"]["ctl"]
        self.assertEqual((entry["command"], entry["args"]), ("python3", ["-S", MCP]), "no machine-specific interpreter")
        old_lines, new_lines = existing.splitlines(), written.splitlines()
        hunks = [op for op in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes()
                 if op[0] != "equal"]
        self.assertEqual(len(hunks), 1, f"the entry goes in at one place, nothing else changes: {hunks}\n{written}")
        tag, i1, i2, j1, j2 = hunks[0]
        if tag == "replace":        # the one change an existing line may take: the comma before the new entry
            self.assertEqual((i2 - i1, new_lines[j1]), (1, old_lines[i1] + ","), f"only lines added:\n{written}")
        else:
            self.assertEqual(tag, "insert", f"only lines added:\n{written}")
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude.json")))
        self.run_install("--scope", "project", project, "--uninstall")
        self.assertEqual(self.snapshot(self.home), before)

    def test_every_client_uninstalls_to_byte_identical_files(self):
        project = os.path.join(self.home, "cur")
        os.makedirs(project)
        codex_path = os.path.join(self.home, ".codex", "config.toml")
        os.makedirs(os.path.dirname(codex_path))
        with open(codex_path, "w") as handle:
            handle.write('model = "o4"\n\n[mcp_servers.other]\ncommand = "x"\n')
        cases = [("--client", "gemini"), ("--client", "cursor", project), ("--client", "cursor", "--scope", "user"),
                 ("--client", "codex"), ("--client", "gemini", "--scope", "project", project), (), ("--hooks",)]
        for case in cases:
            before = self.snapshot(self.home)
            result = self.run_install(*case)
            self.assertEqual(result.returncode, 0, (case, result.stderr))
            self.assertNotEqual(self.snapshot(self.home), before, case)
            self.assertIn("nothing changed", self.run_install(*case).stdout, case)
            self.run_install(*case, "--uninstall")
            self.assertEqual(self.snapshot(self.home), before, case)
        self.run_install("--client", "codex")
        with open(codex_path) as handle:
            text = handle.read()
        self.assertIn('model = "o4"', text)
        self.assertIn(f'command = {json.dumps(sys.executable)}', text)
        if sys.version_info >= (3, 11):
            import tomllib
            self.assertEqual(tomllib.loads(text)["mcp_servers"]["ctl"]["args"], ["-S", MCP])
        self.assertIn('"ctl"', self.run_install("--client", "gemini", "--print").stdout)

    def test_hooks_are_installed_idempotently_and_removed_exactly(self):
        settings = os.path.join(self.home, ".claude", "settings.json")
        os.makedirs(os.path.dirname(settings))
        mine = {"hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "my-guard"}]}]},
                "model": "opus"}
        with open(settings, "w") as handle:
            json.dump(mine, handle, indent=2)
        before = self.snapshot(self.home)
        self.assertEqual(self.run_install("--hooks").returncode, 0)
        hooks = self.read_json(".claude", "settings.json")["hooks"]
        self.assertEqual(set(hooks), {"PreToolUse", "PostToolUse", "PostToolUseFailure", "Stop", "SessionStart"})
        self.assertEqual(hooks["PreToolUse"][0]["hooks"][0]["command"], "my-guard", "the user's own hook stays")
        ours = hooks["PreToolUse"][1]
        self.assertEqual(ours["matcher"], "Edit|Write|NotebookEdit|Bash|Monitor")
        self.assertIn("hook.py", ours["hooks"][0]["command"])
        self.assertTrue(ours["hooks"][0]["command"].endswith("PreToolUse"))
        self.assertIn("nothing changed", self.run_install("--hooks").stdout)
        self.assertIn("hooks in", self.run_install("--status").stdout)
        with open(os.path.join(ROOT, "hooks", "hooks.json")) as handle:
            plugin = json.load(handle)["hooks"]
        self.assertEqual({e: [g.get("matcher") for g in groups] for e, groups in plugin.items()},
                         {e: [g.get("matcher") for g in hooks[e] if "hook.py" in json.dumps(g)] for e in hooks},
                         "the plugin and install.py install the same hooks")
        self.run_install("--uninstall")
        self.assertEqual(self.snapshot(self.home), before)

    def test_status_runs_a_real_handshake(self):
        self.assertEqual(self.run_install("--status").returncode, 1)
        self.run_install()
        result = self.run_install("--status")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("answers (control-tower-lite", result.stdout)
        self.assertIn("11 tools", result.stdout)
        self.assertIn("not running", result.stdout)


class LaunchTest(unittest.TestCase):
    def test_start_status_second_start_stop(self):
        broker = BrokerProcess(port=free_port())
        env = {**broker.env, "HOME": broker.tmp}

        def launch(*args):
            return subprocess.run([sys.executable, LAUNCH, *args], env=env, capture_output=True, text=True, timeout=60)

        try:
            first = launch("--no-browser")
            self.assertEqual(first.returncode, 0, first.stderr)
            self.assertIn("Broker started", first.stdout)
            self.assertIn(f"install.py --hooks --port {broker.port} --state-dir {broker.state_dir}", first.stdout)
            self.assertIn("the plugin cannot: it always uses port 7878", first.stdout)
            pid = int(re.search(r"pid (\d+)", first.stdout).group(1))
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                self.assertIn(b"broker.py", handle.read(), "the printed pid is the running broker's")
            token = broker.secret("operator.token")
            self.assertNotIn(token, first.stdout, "the printed link carries a one-time code, never the token")
            code = re.search(r"http://127\.0\.0\.1:\d+/#code=([A-Za-z0-9_-]+)", first.stdout).group(1)
            self.assertEqual(broker.request("POST", "/link/redeem", {"code": code}),
                             (200, {"token": token, "viewer": "operator"}))
            status, refused = broker.request("POST", "/link/redeem", {"code": code})
            self.assertEqual((status, refused["error"]["code"]), (401, "link_used"), "a link works once")
            self.assertTrue(os.path.exists(os.path.join(broker.state_dir, "broker.log")))
            second = launch("--no-browser")
            self.assertIn("already running", second.stdout)
            broker.join("launched", role="architect")
            status = launch("--status")
            self.assertEqual(status.returncode, 0)
            self.assertIn("launched (architect, alive)", status.stdout)
            self.assertIn("Unread blockers: 0", status.stdout)
            piped = subprocess.run(f"'{sys.executable}' '{LAUNCH}' --status | head -1", shell=True, env=env,
                                   capture_output=True, text=True, timeout=60)
            self.assertEqual(piped.stderr, "", "a reader that stops early is no error")
            with open(os.path.join(broker.state_dir, "broker.log")) as handle:
                self.assertNotIn(token, handle.read(), "the operator token never reaches the log")
            stopped = launch("--stop")
            self.assertIn("stopped", stopped.stdout)
            self.assertEqual(launch("--status").returncode, 1)
            self.assertIn("No broker", launch("--stop").stdout)
        finally:
            broker.cleanup()


class ForegroundTest(unittest.TestCase):
    def test_foreground_prints_the_link_and_stops_with_its_broker(self):
        broker = BrokerProcess(port=free_port())
        proc = subprocess.Popen([sys.executable, LAUNCH, "--foreground"], env={**broker.env, "HOME": broker.tmp},
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
            self.assertRegex(line, r"^Dashboard \(operator; keep the link private\): http://127\.0\.0\.1:\d+/#code=")
            self.assertEqual(broker.request("GET", "/health")[0], 200)
            proc.send_signal(signal.SIGINT)
            proc.wait(15)
            with self.assertRaises(ctl_common.BrokerUnavailable):
                broker.request("GET", "/health", timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            broker.cleanup()


class DashboardHandoffTest(unittest.TestCase):
    """launch.py hands the browser a 0600 file holding a one-time code: no token in any URL or command line."""

    def setUp(self):
        self.broker = BrokerProcess().start()
        self.record = os.path.join(self.broker.tmp, "browser-argv")
        fake = os.path.join(self.broker.tmp, "fake-browser")
        with open(fake, "w") as handle:
            handle.write(f"#!/bin/sh\necho \"$@\" > {self.record}\n")
        os.chmod(fake, 0o755)
        self.env = {**self.broker.env, "BROWSER": fake, "HOME": self.broker.tmp}

    def tearDown(self):
        self.broker.cleanup()

    def open_browser(self) -> str:
        out = subprocess.run([sys.executable, LAUNCH], env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("opened in your browser", out.stdout)
        with open(self.record) as handle:
            argv = handle.read().strip()
        self.assertNotIn("code=", argv)
        return argv.removeprefix("file://")

    def test_the_handoff_file_holds_a_one_time_code_and_goes_once_it_is_used(self):
        page = self.open_browser()
        self.assertEqual(stat.S_IMODE(os.stat(page).st_mode), 0o600)
        with open(page) as handle:
            text = handle.read()
        for name in ("operator.token", "observer.token", "join.secret", "hmac.key"):
            self.assertNotIn(self.broker.secret(name), text)
        code = re.search(r"#code=([A-Za-z0-9_-]+)", text).group(1)
        status, data = self.broker.request("POST", "/link/redeem", {"code": code})
        self.assertEqual((status, data), (200, {"token": self.broker.secret("operator.token"), "viewer": "operator"}))
        self.assertFalse(os.path.exists(page), "the handoff file is deleted when its code is used")
        self.assertEqual(self.broker.request("POST", "/link/redeem", {"code": code})[0], 401)

    def test_a_newer_handoff_file_replaces_an_older_one(self):
        first = self.open_browser()
        with open(first) as handle:
            old_code = re.search(r"#code=([A-Za-z0-9_-]+)", handle.read()).group(1)
        self.assertEqual(self.open_browser(), first)
        with open(first) as handle:
            self.assertNotIn(old_code, handle.read(), "the file holds only the newest code")
        self.assertEqual(self.broker.request("POST", "/link/redeem", {"code": old_code})[0], 200,
                         "an older, unexpired link still works once")
        self.assertTrue(os.path.exists(first), "redeeming an older code leaves the newer file alone")

    def test_an_observer_link_gives_the_observer_token_and_codes_are_not_guessable_by_shape(self):
        out = subprocess.run([sys.executable, LAUNCH, "--observer"], env=self.env, capture_output=True, text=True,
                             timeout=60)
        code = re.search(r"#code=([A-Za-z0-9_-]+)", out.stdout).group(1)
        self.assertGreaterEqual(len(code), 32)
        self.assertNotIn(self.broker.secret("observer.token"), out.stdout)
        status, data = self.broker.request("POST", "/link/redeem", {"code": code})
        self.assertEqual((status, data["viewer"], data["token"]), (200, "observer", self.broker.secret("observer.token")))
        for bad in ("", "x" * 600, 7, None):
            self.assertEqual(self.broker.request("POST", "/link/redeem", {"code": bad})[0] // 100, 4, repr(bad))

    def test_a_top_level_visit_from_another_site_gets_the_page_and_nothing_else(self):
        def get(path, **fetch):
            head = "".join(f"Sec-Fetch-{k.title()}: {v}\r\n" for k, v in fetch.items())
            answer = self.broker.raw(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.broker.port}\r\n{head}"
                                     "Connection: close\r\n\r\n".encode())
            return int(answer.split(b" ", 2)[1])

        visit = {"site": "cross-site", "mode": "navigate", "dest": "document"}
        self.assertEqual(get("/", **visit), 200, "a handoff file's navigation (cross-site in Chromium) is served")
        self.assertEqual(get("/", site="cross-site", mode="no-cors", dest="image"), 403)
        self.assertEqual(get("/", site="cross-site", mode="navigate", dest="iframe"), 403, "never framed")
        self.assertEqual(get("/rooms", **visit), 403, "API calls stay same-origin only")
        self.assertEqual(get("/health", **visit), 403)

    def test_a_page_opened_from_disk_cannot_call_the_api_even_with_a_token(self):
        token = self.broker.secret("operator.token")
        for path in ("/rooms", "/health"):
            answer = self.broker.raw(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.broker.port}\r\nOrigin: null\r\n"
                                     f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
            self.assertTrue(answer.startswith(b"HTTP/1.1 403"), path)
            self.assertNotIn(b"Access-Control-Allow-Origin", answer)


class HandoffCodesTest(unittest.TestCase):
    """The broker's one-time codes in process: they expire, they are few, and an expired file goes."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="ctl-handoff-")
        self.handoffs = dashboard.Handoffs(self.folder, 7878)

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def code_of(self, link):
        return link["url"].rsplit("#code=", 1)[1]

    def test_a_code_expires_and_its_file_goes_with_it(self):
        link = self.handoffs.mint("operator", 1000.0, write_file=True)
        self.assertTrue(os.path.exists(link["file"]))
        with self.assertRaises(ApiError) as caught:
            self.handoffs.redeem(self.code_of(link), 1000.0 + dashboard.CODE_TTL)
        self.assertEqual(caught.exception.status, 401)
        self.assertFalse(os.path.exists(link["file"]))
        fresh = self.handoffs.mint("observer", 2000.0, write_file=False)
        self.assertEqual(self.handoffs.redeem(self.code_of(fresh), 2000.0 + dashboard.CODE_TTL - 1), "observer")

    def test_unused_codes_are_capped(self):
        for _ in range(dashboard.MAX_PENDING):
            self.handoffs.mint("operator", 1000.0, write_file=False)
        with self.assertRaises(ApiError) as caught:
            self.handoffs.mint("operator", 1000.0, write_file=False)
        self.assertEqual(caught.exception.status, 429)
        self.handoffs.mint("operator", 1000.0 + dashboard.CODE_TTL, write_file=False)   # the old ones expired


class LaunchTellsTheTruthTest(unittest.TestCase):
    def setUp(self):
        self.broker = BrokerProcess(port=free_port())
        self.env = {**self.broker.env, "HOME": self.broker.tmp}

    def tearDown(self):
        self.launch("--stop")
        self.broker.cleanup()

    def launch(self, *args):
        return subprocess.run([sys.executable, LAUNCH, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def test_an_unregistered_server_is_said_loudly_with_the_fix(self):
        first = self.launch("--no-browser")
        self.assertIn("not registered with Claude Code", first.stdout)
        self.assertIn("python3 install.py", first.stdout.replace(INSTALL, "install.py"))
        self.assertNotIn("Next: open Claude Code", first.stdout)
        subprocess.run([sys.executable, INSTALL], env=self.env, capture_output=True, timeout=60)
        second = self.launch("--no-browser")
        self.assertIn("Registered with: Claude Code (user)", second.stdout)
        self.assertIn("Next: open Claude Code", second.stdout)

    def test_a_failed_start_shows_only_this_attempts_words_and_status_says_what_answers(self):
        os.makedirs(self.broker.state_dir, mode=0o700)
        with open(os.path.join(self.broker.state_dir, "broker.log"), "w") as handle:
            handle.write("old line: another broker (pid 1) already uses this\n")
        os.chmod(os.path.join(self.broker.state_dir, "broker.log"), 0o600)
        squatter = subprocess.Popen([sys.executable, "-m", "http.server", str(self.broker.port), "--bind", "127.0.0.1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.broker.port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            failed = self.launch("--no-browser")
            self.assertEqual(failed.returncode, 1)
            self.assertIn(f"port {self.broker.port} is in use", failed.stderr)
            self.assertNotIn("old line", failed.stderr)
            status = self.launch("--status")
            self.assertEqual(status.returncode, 1)
            self.assertIn("another HTTP server (SimpleHTTP", status.stdout)
        finally:
            squatter.kill()
            squatter.wait()


class OperationsTest(unittest.TestCase):
    def setUp(self):
        self.broker = BrokerProcess(env={"CTL_RATE_LIMIT": "1000000"}).start()
        self.out = tempfile.mkdtemp(prefix="ctl-ops-")

    def tearDown(self):
        self.broker.cleanup()
        shutil.rmtree(self.out, ignore_errors=True)

    def launch(self, *args):
        return subprocess.run([sys.executable, LAUNCH, *args], env={**self.broker.env, "HOME": self.out},
                              capture_output=True, text=True, timeout=120)

    def test_backup_during_writes_restores_and_passes_integrity(self):
        sender, _ = self.broker.join("b-out"), self.broker.join("b-in")
        stop = threading.Event()
        sent = []

        def write():
            while not stop.is_set():
                status, data = sender.send("b-in", f"load {len(sent)}")
                if status == 200:
                    sent.append(data["message_id"])

        threads = [threading.Thread(target=write) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        target = os.path.join(self.out, "backup.db")
        made = self.launch("--backup", target)
        stop.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual(made.returncode, 0, made.stderr)
        self.assertIn("integrity ok", made.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        self.assertIn("already exists", self.launch("--backup", target).stderr, "a backup never overwrites a file")
        missing = self.launch("--backup", os.path.join(self.out, "no-such-folder", "b.db"))
        self.assertEqual(missing.returncode, 1)
        self.assertIn("does not exist; create it first", missing.stderr)
        self.assertNotIn("Errno", missing.stderr)
        copied = count_messages(target)
        self.assertGreater(copied, 0)
        refused = self.launch("--restore", target)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("stop it first", refused.stderr)
        self.broker.stop()
        restored = self.launch("--restore", target)
        self.assertEqual(restored.returncode, 0, restored.stderr)
        kept = [name for name in os.listdir(self.broker.state_dir) if "before-restore" in name]
        self.assertTrue(kept, "the database it replaced is kept, not deleted")
        self.broker.start()
        status, rooms = self.broker.request("GET", "/rooms", token=self.broker.secret("operator.token"))
        self.assertEqual(status, 200)
        self.assertEqual(self.broker.integrity(), "ok")
        self.assertEqual(count_messages(os.path.join(self.broker.state_dir, "broker.db")), copied)

    def test_export_reads_well_and_doctor_reports_with_fixes(self):
        architect = self.broker.join("e-arch", role="architect")
        worker = self.broker.join("e-work")
        task = architect.ok("POST", "/tasks", {"title": "Write the parser"})
        architect.ok("POST", "/memory", {"key": "format", "value": "JSON Lines"})
        worker.ok("POST", "/tasks/claim", {"task_id": task["id"]})
        worker.ok("POST", "/tasks/complete", {"task_id": task["id"], "summary": "parser.py reads every line",
                                              "files": ["parser.py"]})
        worker.send("e-arch", "# not a heading\nparser done, see #1")
        exported = self.launch("--export", self.out)
        self.assertEqual(exported.returncode, 0, exported.stderr)
        folder = os.path.join(self.out, os.listdir(self.out)[0])
        self.assertEqual(sorted(os.listdir(folder)),
                         ["events.jsonl", "memory.jsonl", "messages.jsonl", "tasks.jsonl", "transcript.md"])
        with open(os.path.join(folder, "tasks.jsonl")) as handle:
            row = json.loads(handle.readline())
        self.assertEqual((row["title"], row["status"], row["files"]), ("Write the parser", "done", ["parser.py"]))
        with open(os.path.join(folder, "transcript.md")) as handle:
            transcript = handle.read()
        self.assertIn("### #1 done", transcript)
        self.assertIn("> parser.py reads every line", transcript)
        self.assertIn("> # not a heading", transcript, "peer text cannot make headings of the transcript")
        self.assertIn("`format` by e-arch", transcript)
        again = self.launch("--export", self.out)
        self.assertEqual(again.returncode, 1, "an export never overwrites an earlier one")
        self.assertIn("already holds an export", again.stderr)
        linked = os.path.join(self.broker.tmp, "linked-out")
        os.symlink(self.broker.tmp, linked)
        refused = self.launch("--export", linked)
        self.assertIn("symbolic link", refused.stderr)
        doctor = self.launch("--doctor")
        self.assertIn("ok  database integrity: ok", doctor.stdout)
        self.assertIn("our broker answers", doctor.stdout)
        self.assertIn("FIX registered with: no client", doctor.stdout)
        self.assertIn("-> register the server", doctor.stdout)
        self.assertEqual(doctor.returncode, 1)


if __name__ == "__main__":
    unittest.main()
