"""install.py against a temporary HOME, and launch.py starting, reporting and stopping a real broker."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from helpers import ROOT, BrokerProcess, free_port

INSTALL = os.path.join(ROOT, "install.py")
LAUNCH = os.path.join(ROOT, "launch.py")
MCP = os.path.join(ROOT, "mcp_server.py")


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

    def test_fresh_file_second_run_and_uninstall(self):
        result = self.run_install()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("registered in", result.stdout)
        entry = self.read_json(".claude.json")["mcpServers"]["ctl"]
        self.assertEqual((entry["type"], entry["command"], entry["args"]), ("stdio", sys.executable, [MCP]))
        before = os.stat(os.path.join(self.home, ".claude.json")).st_mtime_ns
        again = self.run_install()
        self.assertIn("nothing changed", again.stdout)
        self.assertEqual(os.stat(os.path.join(self.home, ".claude.json")).st_mtime_ns, before)
        removed = self.run_install("--uninstall")
        self.assertIn("removed", removed.stdout)
        self.assertEqual(self.read_json(".claude.json")["mcpServers"], {})

    def test_existing_file_keeps_other_keys_and_gets_a_backup(self):
        original = {"theme": "dark", "projects": {"/x": {"allowedTools": []}},
                    "mcpServers": {"other": {"command": "other-server"}}}
        with open(os.path.join(self.home, ".claude.json"), "w") as handle:
            json.dump(original, handle)
        self.assertEqual(self.run_install("--port", "7999").returncode, 0)
        data = self.read_json(".claude.json")
        self.assertEqual(data["theme"], "dark")
        self.assertEqual(data["projects"], original["projects"])
        self.assertEqual(data["mcpServers"]["other"], {"command": "other-server"})
        self.assertEqual(data["mcpServers"]["ctl"]["args"], [MCP, "--port", "7999"])
        self.assertEqual(self.read_json(".claude.json.ctl-backup"), original)
        self.run_install("--uninstall")
        self.assertEqual(self.read_json(".claude.json")["mcpServers"], {"other": {"command": "other-server"}})

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

    def test_project_scope(self):
        project = os.path.join(self.home, "proj")
        os.makedirs(project)
        self.assertEqual(self.run_install("--scope", "project", project).returncode, 0)
        self.assertEqual(self.read_json("proj", ".mcp.json")["mcpServers"]["ctl"]["args"], [MCP])
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude.json")))

    def test_other_clients(self):
        self.assertEqual(self.run_install("--client", "gemini").returncode, 0)
        self.assertEqual(self.read_json(".gemini", "settings.json")["mcpServers"]["ctl"]["command"], sys.executable)
        project = os.path.join(self.home, "cur")
        os.makedirs(project)
        self.assertEqual(self.run_install("--client", "cursor", project).returncode, 0)
        self.assertEqual(self.read_json("cur", ".cursor", "mcp.json")["mcpServers"]["ctl"]["args"], [MCP])
        codex_path = os.path.join(self.home, ".codex", "config.toml")
        os.makedirs(os.path.dirname(codex_path))
        with open(codex_path, "w") as handle:
            handle.write('model = "o4"\n\n[mcp_servers.other]\ncommand = "x"\n')
        self.assertEqual(self.run_install("--client", "codex").returncode, 0)
        self.assertIn("nothing changed", self.run_install("--client", "codex").stdout)
        with open(codex_path) as handle:
            text = handle.read()
        self.assertIn('model = "o4"', text)
        self.assertIn("[mcp_servers.other]", text)
        self.assertIn(f'command = {json.dumps(sys.executable)}', text)
        if sys.version_info >= (3, 11):
            import tomllib
            self.assertEqual(tomllib.loads(text)["mcp_servers"]["ctl"]["args"], [MCP])
        self.run_install("--client", "codex", "--uninstall")
        with open(codex_path) as handle:
            self.assertNotIn("mcp_servers.ctl", handle.read())
        printed = self.run_install("--client", "gemini", "--print")
        self.assertIn('"ctl"', printed.stdout)

    def test_status_runs_a_real_handshake(self):
        self.assertEqual(self.run_install("--status").returncode, 1)
        self.run_install()
        result = self.run_install("--status")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("handshake: OK", result.stdout)
        self.assertIn("11 tools", result.stdout)


class LaunchTest(unittest.TestCase):
    def test_start_status_second_start_stop(self):
        broker = BrokerProcess(port=free_port())
        env = broker.env

        def launch(*args):
            return subprocess.run([sys.executable, LAUNCH, *args], env=env, capture_output=True, text=True, timeout=60)

        try:
            first = launch("--no-browser")
            self.assertEqual(first.returncode, 0, first.stderr)
            self.assertIn("Broker started", first.stdout)
            pid = int(re.search(r"pid (\d+)", first.stdout).group(1))
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                self.assertIn(b"broker.py", handle.read(), "the printed pid is the running broker's")
            token = broker.secret("operator.token")
            self.assertIn(f"/#token={token}", first.stdout)
            self.assertTrue(os.path.exists(os.path.join(broker.state_dir, "broker.log")))
            second = launch("--no-browser")
            self.assertIn("already running", second.stdout)
            broker.join("launched", role="architect")
            status = launch("--status")
            self.assertEqual(status.returncode, 0)
            self.assertIn("launched (architect, alive)", status.stdout)
            self.assertIn("Unread blockers: 0", status.stdout)
            with open(os.path.join(broker.state_dir, "broker.log")) as handle:
                self.assertNotIn(token, handle.read(), "the operator token never reaches the log")
            stopped = launch("--stop")
            self.assertIn("stopped", stopped.stdout)
            self.assertEqual(launch("--status").returncode, 1)
            self.assertIn("No broker", launch("--stop").stdout)
        finally:
            broker.cleanup()


if __name__ == "__main__":
    unittest.main()
