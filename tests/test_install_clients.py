"""install.py --hooks for Codex and Gemini: each client's own file and format, exact removal, and a --status
that says whether the hooks will actually run. Without the real CLIs (the CI stages run those): Codex's trust
is only reported as unknown here, Gemini's folder trust is read from its own files."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from test_install_launch import INSTALL


class ClientHooksTest(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="ctl-home-")
        self.project = os.path.join(self.home, "proj")
        os.makedirs(self.project)
        self.env = {**os.environ, "HOME": self.home, "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}
        for name in ("codex", "gemini"):
            self.assertIsNone(shutil.which(name, path=self.env["PATH"]), "these tests edit files, not the CLIs")

    def tearDown(self):
        shutil.rmtree(self.home, ignore_errors=True)

    def run_install(self, *args):
        return subprocess.run([sys.executable, INSTALL, *args], env=self.env, cwd=self.project,
                              capture_output=True, text=True, timeout=60)

    def path(self, *parts):
        return os.path.join(self.home, *parts)

    def write(self, text, *parts):
        os.makedirs(os.path.dirname(self.path(*parts)), exist_ok=True)
        with open(self.path(*parts), "w") as handle:
            handle.write(text)

    def read(self, *parts):
        with open(self.path(*parts)) as handle:
            return handle.read()

    def test_gemini_hooks_in_its_events_and_milliseconds_removed_exactly(self):
        original = '{\n  "ui": {"theme": "GitHub"},\n  "hooks": {"BeforeTool": [{"hooks": [{"type": "command", ' \
                   '"command": "mine.sh"}]}]}\n}\n'
        self.write(original, ".gemini", "settings.json")
        done = self.run_install("--client", "gemini", "--hooks")
        self.assertEqual(done.returncode, 0, done.stderr)
        settings = json.loads(self.read(".gemini", "settings.json"))
        self.assertEqual(settings["hooksConfig"], {"enabled": True})
        self.assertEqual(sorted(settings["hooks"]), ["AfterAgent", "AfterTool", "BeforeTool", "SessionStart"])
        before_tool = settings["hooks"]["BeforeTool"]
        self.assertEqual(before_tool[0]["hooks"][0]["command"], "mine.sh", "the user's own hook stays first")
        ours = before_tool[1]
        self.assertEqual(ours["matcher"], "^(write_file|replace|run_shell_command)$")
        self.assertEqual(ours["hooks"][0]["timeout"], 10000, "Gemini reads milliseconds")
        self.assertRegex(ours["hooks"][0]["command"], r"hook\.py --client gemini PreToolUse$")
        self.assertRegex(settings["hooks"]["AfterAgent"][0]["hooks"][0]["command"], r"--client gemini Stop$")
        after_tool = settings["hooks"]["AfterTool"][0]
        self.assertEqual(after_tool["matcher"], "^(run_shell_command)$")
        self.assertRegex(after_tool["hooks"][0]["command"], r"hook\.py --client gemini PostToolUse$")
        self.assertEqual(self.run_install("--client", "gemini", "--uninstall").returncode, 0)
        self.assertEqual(self.read(".gemini", "settings.json"), original, "back byte for byte")

    def test_gemini_status_names_the_untrusted_folder_and_the_fix(self):
        self.run_install("--client", "gemini", "--hooks")
        status = self.run_install("--status").stdout
        self.assertIn("Gemini CLI shows it Disabled here", status)
        self.assertIn(f"NOT RUNNING: {self.project} is not trusted", status)
        self.assertIn(f"--client gemini --trust {self.project}", status)
        trusted = self.run_install("--client", "gemini", "--trust")
        self.assertEqual(trusted.returncode, 0, trusted.stderr)
        self.assertEqual(json.loads(self.read(".gemini", "trustedFolders.json")),
                         {os.path.realpath(self.project): "TRUST_FOLDER"})
        status = self.run_install("--status").stdout
        self.assertIn("they will run in", status)
        self.assertNotIn("NOT RUNNING", status)
        self.write(json.dumps({os.path.realpath(self.project): "TRUST_FOLDER",
                               os.path.join(os.path.realpath(self.project), "sub"): "DO_NOT_TRUST"}),
                   ".gemini", "trustedFolders.json")
        os.makedirs(os.path.join(self.project, "sub"))
        sub = subprocess.run([sys.executable, INSTALL, "--status"], env=self.env, capture_output=True, text=True,
                             cwd=os.path.join(self.project, "sub"), timeout=60).stdout
        self.assertIn("sub is distrusted", sub, "the longest matching rule wins, as in Gemini CLI")
        settings = json.loads(self.read(".gemini", "settings.json"))
        settings["hooksConfig"]["enabled"] = False
        self.write(json.dumps(settings), ".gemini", "settings.json")
        self.assertIn("NOT RUNNING: hooksConfig.enabled is false", self.run_install("--status").stdout)

    def test_hooks_an_older_release_installed_are_reported_outdated_with_the_fix(self):
        """An install from before a hook was added (Gemini's AfterTool, Claude Code's PostToolUseFailure) or a
        matcher changed would leave shell writes unreported while --status said the hooks run."""
        self.run_install("--client", "gemini", "--hooks")
        self.run_install("--client", "gemini", "--trust")
        self.run_install("--hooks")
        settings = json.loads(self.read(".gemini", "settings.json"))
        del settings["hooks"]["AfterTool"]
        self.write(json.dumps(settings), ".gemini", "settings.json")
        claude = json.loads(self.read(".claude", "settings.json"))
        claude["hooks"]["PostToolUse"][0]["matcher"] = "Bash"           # as before Monitor was guarded
        self.write(json.dumps(claude), ".claude", "settings.json")
        status = self.run_install("--status").stdout
        self.assertIn("OUTDATED: installed by an older release (AfterTool missing or different); "
                      "fix: ", status)
        self.assertRegex(status, r"OUTDATED: installed by an older release \(PostToolUse missing or different\); "
                                 r"fix: .*install\.py --client claude --hooks\n")
        self.assertNotIn("will run", status)
        self.run_install("--client", "gemini", "--hooks")
        self.run_install("--client", "claude", "--hooks")
        status = self.run_install("--status").stdout
        self.assertNotIn("OUTDATED", status)
        self.assertIn("they will run in", status)

    def test_codex_hooks_file_and_an_honest_status_without_codex(self):
        self.write('model = "gpt-5.5"\n', ".codex", "config.toml")
        done = self.run_install("--client", "codex", "--hooks")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("Codex's trust in the hooks NOT recorded (the codex command is not on PATH)", done.stdout)
        hooks = json.loads(self.read(".codex", "hooks.json"))
        self.assertEqual(list(hooks), ["hooks"], "Codex refuses a hooks.json with any other top-level key")
        self.assertEqual(hooks["hooks"]["PreToolUse"][0]["matcher"], "^(apply_patch|Bash)$")
        self.assertEqual(hooks["hooks"]["PostToolUse"][0]["matcher"], "^(Bash)$")
        self.assertRegex(hooks["hooks"]["PostToolUse"][0]["hooks"][0]["command"], r"--client codex PostToolUse$")
        self.assertEqual(hooks["hooks"]["Stop"][0]["hooks"][0]["timeout"], 10, "Codex reads seconds")
        status = self.run_install("--status").stdout
        self.assertIn("cannot tell whether Codex trusts them (the codex command is not on PATH)", status)
        self.assertEqual(self.run_install("--client", "codex", "--uninstall").returncode, 0)
        self.assertEqual(self.read(".codex", "config.toml"), 'model = "gpt-5.5"\n')
        self.assertFalse(os.path.exists(self.path(".codex", "hooks.json")), "a file we created is gone")

    def test_cursor_server_entry_has_its_documented_shape(self):
        """Cursor's documented mcp.json (cursor.com/docs/mcp): servers under `mcpServers`, a local one as
        `command`, `args` and optionally `env`; project scope DIR/.cursor, user scope ~/.cursor. No Cursor CLI
        runs in CI, so this is all that is checked of it."""
        mine = {"mcpServers": {"other": {"url": "https://example.invalid/mcp"}}}
        self.write(json.dumps(mine), "proj", ".cursor", "mcp.json")
        self.assertEqual(self.run_install("--client", "cursor").returncode, 0)
        written = json.loads(self.read("proj", ".cursor", "mcp.json"))
        self.assertEqual(list(written), ["mcpServers"])
        self.assertEqual(written["mcpServers"]["other"], mine["mcpServers"]["other"], "the user's server stays")
        ours = written["mcpServers"]["ctl"]
        self.assertLessEqual(set(ours), {"command", "args", "env"})
        self.assertIsInstance(ours["command"], str)
        self.assertTrue(ours["args"] and all(isinstance(a, str) for a in ours["args"]))
        self.assertTrue(ours["args"][-1].endswith("mcp_server.py"), ours)
        self.assertEqual(self.run_install("--client", "cursor", "--scope", "user").returncode, 0)
        self.assertIn("ctl", json.loads(self.read(".cursor", "mcp.json"))["mcpServers"])

    def test_hooks_for_cursor_are_refused_clearly(self):
        done = self.run_install("--client", "cursor", "--hooks")
        self.assertEqual(done.returncode, 1)
        self.assertIn("Cursor hooks are not supported; leave out --hooks", done.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.project, ".cursor")), "refused before anything is written")
        self.assertIn("--trust is for --client gemini", self.run_install("--client", "codex", "--trust").stderr)


if __name__ == "__main__":
    unittest.main()
