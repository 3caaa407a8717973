"""Each client's hook dialect (ctl/dialects.py): the paths its tools write, and its form of a refusal, through
hook.py --client NAME against a real broker, as a child of the session's agent process."""
import os
import unittest

from test_hooks import HookTestCase

from ctl import dialects

PATCH = ("*** Begin Patch\n*** Update File: src/held.py\n@@\n-a\n+b\n*** Add File: new.py\n+x\n"
         "*** Delete File: old.py\n*** Update File: moved.py\n*** Move to: renamed.py\n@@\n-a\n+b\n*** End Patch\n")


class WriteTargetsTest(unittest.TestCase):
    def test_apply_patch_names_every_file_it_touches(self):
        codex = dialects.CLIENTS["codex"]
        self.assertEqual(codex.write_targets("apply_patch", {"command": PATCH}),
                         ["src/held.py", "new.py", "old.py", "moved.py", "renamed.py"])
        self.assertEqual(codex.write_targets("apply_patch", {"command": "*** Update File:\n+x"}), [])
        self.assertEqual(codex.write_targets("apply_patch", {"command": 7}), [])
        self.assertEqual(codex.write_targets("read_file", {"file_path": "a"}), [], "a reader writes nothing")

    def test_gemini_tools_and_claude_tools(self):
        gemini, claude = dialects.CLIENTS["gemini"], dialects.CLIENTS["claude"]
        self.assertEqual(gemini.write_targets("write_file", {"file_path": "a.py", "content": "x"}), ["a.py"])
        self.assertEqual(gemini.write_targets("replace", {"file_path": "/p/b.py"}), ["/p/b.py"])
        self.assertEqual(gemini.write_targets("Edit", {"file_path": "a.py"}), [], "not a Gemini tool")
        self.assertEqual(claude.write_targets("NotebookEdit", {"notebook_path": "n.ipynb"}), ["n.ipynb"])
        self.assertEqual(claude.write_targets("Write", {"file_path": ["not", "a", "path"]}), [])
        self.assertEqual(gemini.shell_command("run_shell_command", {"command": "sed -i s/a/b/ x"}), "sed -i s/a/b/ x")
        self.assertEqual(claude.shell_command("Bash", {"command": ["x"]}), None)
        self.assertEqual(claude.shell_command("Edit", {"command": "x"}), None, "not a shell tool")
        self.assertEqual(claude.shell_command("Monitor", {"command": "tail -f log | tee copy"}), "tail -f log | tee copy")
        self.assertNotIn("MultiEdit", claude.writers, "no current Claude Code has it")
        self.assertEqual(dialects.CLIENTS["codex"].shell_command("Bash", {"command": "ls"}), "ls", "as its hooks name it")

    def test_a_shell_call_runs_in_the_folder_it_names(self):
        gemini, codex = dialects.CLIENTS["gemini"], dialects.CLIENTS["codex"]
        self.assertEqual(gemini.shell_folder("run_shell_command", {"command": "ls", "dir_path": "src"}, "/p"), "/p/src")
        self.assertEqual(gemini.shell_folder("run_shell_command", {"command": "ls", "dir_path": "/q"}, "/p"), "/q")
        self.assertEqual(gemini.shell_folder("run_shell_command", {"command": "ls", "dir_path": 3}, "/p"), "/p")
        self.assertEqual(codex.shell_folder("Bash", {"command": "ls", "dir_path": "src"}, "/p"), "/p")

    def test_install_rows_use_each_clients_events_and_units(self):
        self.assertEqual(dialects.CLIENTS["gemini"].events["Stop"][0], "AfterAgent")
        self.assertEqual(dialects.CLIENTS["gemini"].timeout_scale, 1000, "Gemini timeouts are milliseconds")
        self.assertRegex("write_file", dialects.CLIENTS["gemini"].events["PreToolUse"][1])
        self.assertNotRegex("write_file_x", dialects.CLIENTS["gemini"].events["PreToolUse"][1])
        self.assertEqual(dialects.CLIENTS["gemini"].events["PostToolUse"], ("AfterTool", "^(run_shell_command)$"))
        self.assertEqual(dialects.CLIENTS["codex"].events["PostToolUse"], ("PostToolUse", "^(Bash)$"))


class DialectHookTest(HookTestCase):
    def test_codex_apply_patch_is_refused_in_claudes_form_with_nothing_else(self):
        alice, bob = self.agent("alice"), self.agent("bob")
        os.makedirs(os.path.join(self.project, "src"), exist_ok=True)
        alice.ok("lock_file", {"path": "src/held.py", "reason": "refactor"})
        code, out, _ = bob.hook("PreToolUse", {"tool_name": "apply_patch", "tool_input": {"command": PATCH}},
                                extra_args=("--client", "codex"))
        self.assertEqual(code, 0)
        self.assertEqual(list(out), ["hookSpecificOutput"], "Codex refuses an answer with any other top-level key")
        self.assertEqual(out["hookSpecificOutput"]["permissionDecision"], "deny")
        self.assertRegex(out["hookSpecificOutput"]["permissionDecisionReason"],
                         r"^src/held\.py is locked by alice for \"refactor\" since ")
        code, out, _ = bob.hook("PreToolUse", {"tool_name": "apply_patch",
                                               "tool_input": {"command": PATCH.replace("src/held.py", "free.py")}},
                                extra_args=("--client", "codex"))
        self.assertEqual((code, out), (0, None), "every file free: the patch goes ahead")
        locks = self.locks()
        for path in ("free.py", "new.py", "old.py", "moved.py", "renamed.py"):
            self.assertEqual((locks[path]["holder"], locks[path]["reason"]), ("bob", "auto: apply_patch"))

    def test_gemini_write_file_is_refused_with_a_top_level_decision(self):
        alice, bob = self.agent("alice"), self.agent("bob")
        alice.ok("lock_file", {"path": "locked.txt"})
        target = os.path.join(self.project, "locked.txt")
        code, out, _ = bob.hook("PreToolUse", {"tool_name": "write_file",
                                               "tool_input": {"file_path": target, "content": "x"}},
                                extra_args=("--client", "gemini"))
        self.assertEqual((code, out["decision"]), (0, "deny"))
        self.assertRegex(out["reason"], r"^locked\.txt is locked by alice since ")
        self.assertNotIn("hookSpecificOutput", out, "Gemini ignores permissionDecision")
        code, out, _ = bob.hook("PreToolUse", {"tool_name": "replace",
                                               "tool_input": {"file_path": "free.txt", "old_string": "a"}},
                                extra_args=("--client", "gemini"))
        self.assertEqual((code, out), (0, None))
        self.assertEqual(self.locks()["free.txt"]["reason"], "auto: replace", "relative to the session's cwd")

    def test_shell_writes_are_refused_in_each_clients_form_and_reported_after(self):
        alice, bob = self.agent("alice"), self.agent("bob")
        os.makedirs(os.path.join(self.project, "src"), exist_ok=True)
        held = os.path.join(self.project, "src", "held.py")
        with open(held, "w") as handle:
            handle.write("a = 1\n")
        alice.ok("lock_file", {"path": "src/held.py", "reason": "refactor"})
        code, out, _ = bob.hook("PreToolUse", {"tool_name": "Bash", "tool_input": {"command": "sed -i s/a/b/ src/held.py"},
                                               "tool_use_id": "c1"}, extra_args=("--client", "codex"))
        self.assertEqual((code, list(out), out["hookSpecificOutput"]["permissionDecision"]),
                         (0, ["hookSpecificOutput"], "deny"))
        shell = {"tool_name": "run_shell_command", "tool_input": {"command": "echo x > held.py", "dir_path": "src"}}
        code, out, _ = bob.hook("PreToolUse", shell, extra_args=("--client", "gemini"))
        self.assertEqual((code, out["decision"]), (0, "deny"), "held.py in the folder the call names")
        self.assertRegex(out["reason"], r"^src/held\.py is locked by alice for \"refactor\" since ")
        unseen = {"tool_name": "run_shell_command", "tool_input": {"command": "python3 gen.py"}}
        self.assertIsNone(bob.hook("PreToolUse", unseen, extra_args=("--client", "gemini"))[1])
        with open(held, "a") as handle:             # what the script did
            handle.write("b = 2\n")
        code, out, _ = bob.hook("PostToolUse", {**unseen, "tool_response": {"llmContent": ""}},
                                extra_args=("--client", "gemini"))      # AfterTool: no tool_use_id in Gemini's events
        self.assertEqual(code, 0)
        self.assertIn("src/held.py is locked by alice", out["hookSpecificOutput"]["additionalContext"])

    def test_an_unknown_client_is_a_usage_error(self):
        alice = self.agent("alice")
        code, out, err = alice.hook("PreToolUse", {}, extra_args=("--client", "vim"))
        self.assertEqual((code, out), (2, None))
        self.assertIn("--client {claude,codex,gemini}", err)


if __name__ == "__main__":
    unittest.main()
