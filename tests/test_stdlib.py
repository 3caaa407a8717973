"""The product ships with zero dependencies: every module it runs imports the standard library only."""
import ast
import pathlib
import sys
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A standard module that only some supported Pythons (3.10+) have, imported with a fallback: tomllib came in
# 3.11, so it is not in 3.10's list.
VERSIONED_STDLIB = {"tomllib"}


def foreign_imports(root: pathlib.Path) -> list:
    """`file:line: imports name` for every import of something outside the stdlib and our package."""
    allowed = set(sys.stdlib_module_names) | {"ctl", "__future__"} | VERSIONED_STDLIB
    found = []
    for path in sorted([*root.glob("*.py"), *(root / "ctl").glob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno}: imports {name}"
                      for name in names if name.split(".")[0] not in allowed]
    return found


class StdlibOnlyTest(unittest.TestCase):
    def test_product_imports_only_the_standard_library(self):
        self.assertEqual(foreign_imports(ROOT), [])

    def test_the_builtin_sha256_is_this_pythons_own(self):
        """common imports it by the running version's name (3.12 renamed _sha256 to _sha2), out of the check's sight."""
        from ctl import common
        module = type(common.sha256(b"")).__module__
        self.assertIn(module.split(".")[0], set(sys.stdlib_module_names) - {"hashlib", "_hashlib"},
                      "the builtin, not hashlib's OpenSSL")

    def test_the_check_catches_a_foreign_import(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = pathlib.Path(tmp)
            (root / "ctl").mkdir()
            (root / "ctl" / "thing.py").write_text("import os\nfrom ctl import common\nimport requests\n")
            self.assertEqual(foreign_imports(root), ["ctl/thing.py:3: imports requests"])


if __name__ == "__main__":
    unittest.main()
