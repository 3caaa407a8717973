"""A hook process starts on every edit, so what it imports is its cost (bench/ measures it): it loads no
module it does not need, and the lean stand-ins it uses instead (ctl.lightjson, common.hmac_sha256) give
exactly what the standard ones give."""
import hashlib
import hmac
import json
import os
import subprocess
import sys
import unittest

from helpers import ROOT

from ctl import common, lightjson

# Modules that cost a hook process milliseconds to import and that an edit's hook does not need.
HEAVY = ("re", "json", "socket", "hashlib", "_hashlib", "enum", "secrets", "subprocess", "http", "email",
         "selectors", "threading", "collections", "dataclasses", "typing")

SAMPLES = ['{"tool_name": "Edit", "tool_input": {"file_path": "/p/caf\\u00e9.py", "old_string": "a\\nb"}}',
           '[1, -2.5e3, true, false, null, "\\ud83d\\ude00", {"": []}]', '"\\u0000 \\t \\" \\\\ /"',
           ' {"nested": [[[[{"x": 1}]]]]} \n', '{"big": ' + str(10 ** 30) + ', "nan": NaN, "inf": -Infinity}',
           '{"same": 1, "same": 2}']


class LeanHookTest(unittest.TestCase):
    def test_an_edit_hook_imports_nothing_heavy(self):
        probe = ("import sys; sys.path.insert(0, sys.argv[1]); import ctl.hooks; "
                 "print(' '.join(sorted(m for m in sys.modules)))")
        loaded = subprocess.run([sys.executable, "-S", "-c", probe, ROOT], capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("CTL_")}, check=True)
        modules = set(loaded.stdout.split())
        self.assertIn("ctl.hooks", modules)
        self.assertEqual(sorted(m for m in HEAVY if m in modules), [], "imported by every edit's hook")

    def test_lightjson_reads_and_writes_as_json_does(self):
        self.assertIs(lightjson.loads, lightjson._c_loads, "the C accelerator is in use on CPython")
        for text in SAMPLES:
            value = lightjson.loads(text)
            self.assertEqual(json.dumps(value), json.dumps(json.loads(text)), text)
            self.assertEqual(lightjson.dumps(value), json.dumps(value, separators=(",", ":")))
            self.assertEqual(lightjson.dumps(value, ensure_ascii=False, sort_keys=True),
                             json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
        self.assertEqual(lightjson.loads(b'{"a": "\\u00e9"}'), {"a": "é"})
        for bad in ("", "{", '{"a": 1} trailing', "[1,]", "nul", '"\\x"', "{'a': 1}"):
            with self.assertRaises(ValueError, msg=bad):
                lightjson.loads(bad)
        with self.assertRaises(TypeError):
            lightjson.dumps({"a": object()})

    def test_hmac_sha256_is_rfc_2104(self):
        for size in (0, 1, 32, 63, 64, 65, 200):
            key, message = os.urandom(size), os.urandom(size * 3)
            self.assertEqual(common.hmac_sha256(key, message), hmac.new(key, message, hashlib.sha256).digest())


if __name__ == "__main__":
    unittest.main()
