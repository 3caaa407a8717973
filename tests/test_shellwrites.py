"""The shell command reader: which files a command writes, on a corpus of real commands, and a bound on
what hostile text can cost it."""
import os
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctl.shellwrites import MAX_COMMAND, Target, write_targets  # noqa: E402

R, W = False, True          # the `unknown` column: read fully (nothing unseen) or something left for after
ANY = None                  # unknown may or may not be reported

# (command, files written: "x" a file, "x/" it and everything under it, "x*" a pattern; unknown expected)
CORPUS = [
    # reads never name targets
    ("cat models.py", [], R),
    ("cat models.py | grep -n def | head -20", [], R),
    ("grep -rn 'TODO' src/ > /dev/null 2>&1", [], R),
    ("ls -la src", [], R),
    ("git diff", [], R),
    ("git diff --stat HEAD~1 -- models.py", [], R),
    ("git status --short", [], R),
    ("git log --oneline -5", [], R),
    ("git show HEAD:models.py", [], R),
    ("git blame models.py", [], R),
    ("sed -n '1,20p' models.py", [], R),
    ("sed 's/a/b/' models.py", [], R),
    ("head -c 100 models.py; tail -n 5 models.py", [], R),
    ("wc -l *.py", [], R),
    ("find . -name '*.py' -newer models.py", [], R),
    ("diff -u models.py other.py", [], R),
    ("echo hello", [], R),
    ("printf '%s\\n' a b c", [], R),
    ("test -f models.py && echo yes || echo no", [], R),
    ("[[ -f models.py && a < b ]] && echo ok", [], R),
    ("cd src && ls", [], R),
    ("jq .name package.json", [], R),
    ("awk '{print $1}' models.py", [], R),
    ("sort -u names.txt | uniq -c", [], R),
    ("rg -l 'class ' --type py", [], R),
    ("stat -c %s models.py", [], R),
    ("echo $HOME; pwd", [], R),
    ("cat models.py 2>&1 | less", [], R),
    ("for f in a b c; do echo $f; done", [], R),
    ("if [ -d src ]; then ls src; fi", [], R),
    ("x=$(cat models.py | wc -l); echo $x", [], R),
    ("echo 'rm -rf / > x'", [], R),
    ('echo "sed -i s/a/b/ models.py"', [], R),
    ("# rm models.py", [], R),
    ("echo a >&2", [], R),
    ("exec 3>&1", [], R),
    ("tar -tzf archive.tgz", [], R),
    ("curl -s https://example.com | jq .", [], R),
    ("git grep -n foo -- '*.py'", [], R),
    ("sleep 1 && echo done", [], R),
    ("xargs -n1 echo < names.txt", [], R),
    ("sudo -u nobody cat /etc/hosts", [], R),
    ("timeout 5 grep foo models.py", [], R),
    ("env LC_ALL=C sort names.txt", [], R),
    ("black --check src/models.py", [], R),
    ("gzip -c models.py | wc -c", [], R),
    ("git stash list", [], R),
    ("git apply --check fix.patch", [], R),
    ("patch --dry-run -p1 < fix.patch", [], R),
    ("echo ok > /dev/null", [], R),
    # redirections
    ("echo x > out.txt", ["out.txt"], R),
    ("echo x >> out.txt", ["out.txt"], R),
    ("echo x >| out.txt", ["out.txt"], R),
    ("make 2> errors.log", ["errors.log"], W),
    ("ls &> all.log", ["all.log"], R),
    ("ls &>> all.log", ["all.log"], R),
    ("ls 1>out.txt 2>err.txt", ["out.txt", "err.txt"], R),
    ("ls >& both.txt", ["both.txt"], R),
    ("cat <> rw.txt", ["rw.txt"], R),
    ("> empty.txt", ["empty.txt"], R),
    (": > models.py", ["models.py"], R),
    ("echo x>out.txt", ["out.txt"], R),
    ("echo 'a' > 'my file.txt'", ["my file.txt"], R),
    ('echo "a" > "src/new name.py"', ["src/new name.py"], R),
    ("echo x > ~/notes.txt", [os.path.expanduser("~/notes.txt")], R),
    ("echo x > /tmp/abs.txt", ["/tmp/abs.txt"], R),
    ("echo x > $OUT", [], W),
    ('echo x > "$(date).log"', [], W),
    ("{ echo a; echo b; } > grouped.txt", ["grouped.txt"], R),
    ("( cd src && echo x ) > sub.txt", ["sub.txt"], R),
    ("for f in a b; do echo $f; done > loop.txt", ["loop.txt"], R),
    ("exec > session.log", ["session.log"], R),
    ("echo a |& tee -a both.log", ["both.log"], R),
    # here-documents
    ("cat > notes.md <<EOF\n# Notes\n$HOME\nEOF", ["notes.md"], R),
    ("cat <<'EOF' > config.json\n{\"a\": \"> not.txt\"}\nEOF", ["config.json"], R),
    ("cat <<-EOF >> log.txt\n\tline\n\tEOF\necho after > after.txt", ["log.txt", "after.txt"], R),
    ("git commit -m \"$(cat <<'EOF'\nFix ) the > parser\nEOF\n)\"", [], R),
    ("python3 - <<'EOF'\nopen('x.py', 'w').write('1')\nEOF", [], W),
    ("bash <<'EOF'\nsed -i 's/a/b/' models.py\nEOF", ["models.py"], R),
    ("cat <<< 'text' > here.txt", ["here.txt"], R),
    ("cat > free.txt << 'EOF'\necho bob > locked.txt\nsed -i 's/a/b/' models.py\nEOF", ["free.txt"], R),
    ("cat << EOF > notes.md\nit's > here\nEOF\necho done > after.txt", ["notes.md", "after.txt"], R),
    ("cat <<- 'EOF' >> log.txt\n\trm -rf src\n\tEOF", ["log.txt"], R),
    ("git commit -q -m \"$(cat << 'EOF'\nFix > the parser\nEOF\n)\"", [], R),
    # tee
    ("echo x | tee out.txt", ["out.txt"], R),
    ("echo x | tee -a one.txt two.txt > /dev/null", ["one.txt", "two.txt"], R),
    ("echo x | sudo tee /etc/hosts.local", ["/etc/hosts.local"], R),
    # in-place editors
    ("sed -i 's/foo/bar/g' models.py", ["models.py"], R),
    ("sed -i.bak -e 's/a/b/' -e 's/c/d/' models.py other.py", ["models.py", "other.py"], R),
    ("sed --in-place=.orig 's/a/b/' models.py", ["models.py"], R),
    ("sed -Ei 's/(a)/\\1b/' src/models.py", ["src/models.py"], R),
    ("sed -i '' 's/a/b/' models.py", ["models.py"], R),
    ("sed -n 'w copy.txt' models.py", [], W),
    ("perl -pi -e 's/foo/bar/' models.py", ["models.py"], R),
    ("perl -i.bak -pe 's/a/b/' a.py b.py", ["a.py", "b.py"], R),
    ("perl -ne 'print if /x/' models.py", [], W),
    ("ruby -i -pe 'gsub(/a/, \"b\")' models.py", ["models.py"], R),
    ("gawk -i inplace '{print}' models.py", ["models.py"], R),
    ("awk '{print > \"out.txt\"}' models.py", [], W),
    ("ed -s models.py <<< $',s/a/b/g\\nw'", ["models.py"], R),
    ("ex -sc '%s/a/b/|x' models.py", ["models.py"], R),
    ("vim -c 'wq' models.py", ["models.py"], R),
    # file utilities
    ("rm models.py", ["models.py"], R),
    ("rm -f a.py b.py", ["a.py", "b.py"], R),
    ("rm -rf build", ["build/"], R),
    ("rm -- -weird.py", ["-weird.py"], R),
    ("rm *.pyc", ["*.pyc"], R),
    ("rm src/{a,b}.py", ["src/a.py", "src/b.py"], R),
    ("cp models.py backup.py", ["backup.py"], R),
    ("cp models.py src/", ["src/models.py"], R),
    ("cp models.py src", ["src/models.py"], R),
    ("cp -r src dest", ["dest/"], R),
    ("cp a.py b.py src", ["src/a.py", "src/b.py"], R),
    ("cp -t src a.py", ["src/a.py"], R),
    ("mv old.py new.py", ["new.py/", "old.py/"], R),
    ("mv models.py src/", ["src/models.py/", "models.py/"], R),
    ("ln -s models.py link.py", ["link.py"], R),
    ("ln -sf ../models.py src/link.py", ["src/link.py"], R),
    ("install -m 644 models.py /tmp/installed.py", ["/tmp/installed.py"], R),
    ("touch new.py", ["new.py"], R),
    ("touch -d '2020-01-01' models.py", ["models.py"], R),
    ("truncate -s 0 models.py", ["models.py"], R),
    ("chmod +x run.sh", ["run.sh"], R),
    ("chmod -R 755 src", ["src/"], R),
    ("chown user:group models.py", ["models.py"], R),
    ("mkdir -p src/new", ["src/new"], R),
    ("dd if=/dev/zero of=blob.bin bs=1k count=1", ["blob.bin"], R),
    ("shred -u secret.txt", ["secret.txt"], R),
    ("sort -o sorted.txt names.txt", ["sorted.txt"], R),
    ("uniq names.txt uniq.txt", ["uniq.txt"], R),
    ("tar -czf out.tgz src", ["out.tgz"], R),
    ("tar czf out.tgz src", ["out.tgz"], R),
    ("tar -xzf archive.tgz", [], W),
    ("gzip models.py", ["models.py", "models.py.gz"], R),
    ("curl -sSo page.html https://example.com", ["page.html"], R),
    ("curl --output=page.html https://example.com", ["page.html"], R),
    ("curl -O https://example.com/x.py", [], W),
    ("wget -O page.html https://example.com", ["page.html"], R),
    ("rsync -av src/ /tmp/mirror", ["/tmp/mirror/"], R),
    ("xxd -r dump.hex models.py", ["models.py"], R),
    ("find . -name '*.tmp' -exec rm {} \\;", [], W),
    ("find . -name '*.tmp' | xargs rm -f", [], W),
    # git with paths
    ("git checkout -- models.py", ["models.py/"], R),
    ("git checkout HEAD~1 -- src/models.py", ["src/models.py/"], R),
    ("git checkout models.py", ["models.py/"], R),
    ("git checkout main", [], W),
    ("git checkout -b feature", [], W),
    ("git restore models.py", ["models.py/"], R),
    ("git restore --staged --worktree src", ["src/"], R),
    ("git restore -s HEAD~2 models.py", ["models.py/"], R),
    ("git reset -- models.py", ["models.py/"], R),
    ("git reset --hard HEAD", [], W),
    ("git reset HEAD~1", [], R),
    ("git rm --cached models.py", ["models.py/"], R),
    ("git mv models.py src/models2.py", ["src/models2.py/", "models.py/"], R),
    ("git -C src checkout -- models.py", ["src/models.py/"], R),
    ("git stash", [], W),
    ("git pull --rebase", [], W),
    ("git apply fix.patch", ["models.py"], R),
    ("git apply <<'EOF'\n--- a/src/models.py\n+++ b/src/models.py\n@@ -1 +1 @@\n-a\n+b\nEOF", ["src/models.py"], R),
    ("git add -A && git commit -m 'x'", [], R),
    ("git frobnicate", [], W),
    # patch
    ("patch models.py fix.patch", ["models.py"], R),
    ("patch -p1 < fix.patch", [], W),
    ("patch -p1 -i fix.patch", ["models.py"], R),
    ("patch -p1 <<'EOF'\n--- a/src/models.py\n+++ b/src/models.py\n@@ -1 +1 @@\n-a\n+b\nEOF", ["src/models.py"], R),
    ("patch -o patched.py models.py fix.patch", ["patched.py"], R),
    # chains, pipelines, subshells, substitutions, prefixes
    ("cd src && sed -i 's/a/b/' models.py", ["src/models.py"], R),
    ("cd src; cd ..; echo x > top.txt", ["top.txt"], R),
    ("(cd src && touch inner.py); touch outer.py", ["src/inner.py", "outer.py"], R),
    ("cd $DIR && touch x.py", [], W),
    ("true && rm a.py || rm b.py; rm c.py & rm d.py", ["a.py", "b.py", "c.py", "d.py"], R),
    ("echo $(rm a.py) `touch b.py`", ["a.py", "b.py"], R),
    ("diff <(sort a.txt) <(sort b.txt) > diff.txt", ["diff.txt"], R),
    ("bash -c 'echo x > inner.txt'", ["inner.txt"], R),
    ("sh -c \"bash -c 'rm deep.py'\"", ["deep.py"], R),
    ("bash -c \"$CMD\"", [], W),
    ("eval 'rm evaled.py'", ["evaled.py"], R),
    ("sudo rm -rf /opt/thing", ["/opt/thing/"], R),
    ("env FOO=1 BAR=2 rm env.py", ["env.py"], R),
    ("FOO=1 rm assigned.py", ["assigned.py"], R),
    ("nice -n 10 timeout 30 rm slow.py", ["slow.py"], R),
    ("nohup sed -i s/a/b/ models.py &", ["models.py"], R),
    ("xargs rm < list.txt", [], W),
    ("/bin/rm /tmp/x.py", ["/tmp/x.py"], R),
    ("if true; then rm then.py; else rm else.py; fi", ["then.py", "else.py"], R),
    ("while read f; do rm \"$f\"; done < list.txt", [], W),
    ("f() { rm fn.py; }; f", ["fn.py"], W),
    ("case $x in a) rm case.py;; esac", ["case.py"], R),
    # programs the text cannot see into
    ("python3 scripts/gen.py", [], W),
    ("python3 -c 'open(\"models.py\",\"w\")'", [], W),
    ("node build.js", [], W),
    ("make", [], W),
    ("npm run format", [], W),
    ("pytest -x tests", [], W),
    ("./run.sh", [], W),
    ("source env.sh", [], W),
    ("black src/models.py", ["src/models.py"], R),
    ("black .", [], W),
    ("gofmt -w models.py", ["models.py"], R),
    ("gofmt -l .", [], R),
    ("gofmt -w ./src", [], W),
    ("prettier --write models.py", ["models.py"], R),
    ("ruff format models.py", ["models.py"], R),
    ("clang-format -i models.py", ["models.py"], R),
    ("$EDITOR models.py", [], W),
]


class CorpusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cwd = os.path.realpath(tempfile.mkdtemp(prefix="ctl-sw-"))
        os.makedirs(os.path.join(cls.cwd, "src"))
        for name in ("models.py", "other.py", "a.py", "b.py", "src/models.py", "names.txt"):
            open(os.path.join(cls.cwd, name), "w").close()
        with open(os.path.join(cls.cwd, "fix.patch"), "w") as handle:
            handle.write("--- a/models.py\n+++ b/models.py\n@@ -1 +1 @@\n-a\n+b\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.cwd, ignore_errors=True)

    def expected(self, spec: str) -> Target:
        tree, glob = spec.endswith("/"), "*" in spec
        path = spec.rstrip("/") if tree else spec
        return Target(os.path.normpath(os.path.join(self.cwd, path)), tree, glob)

    def test_the_corpus(self):
        self.assertGreaterEqual(len(CORPUS), 100)
        for command, files, unknown in CORPUS:
            with self.subTest(command=command):
                found = write_targets(command, self.cwd)
                self.assertEqual(sorted(found.targets, key=str), sorted(map(self.expected, files), key=str),
                                 f"unknown: {found.unknown}")
                if unknown is not None:
                    self.assertEqual(bool(found.unknown), unknown, found.unknown)

    def test_targets_match_locked_names(self):
        writes = write_targets("rm -rf src; sed -i s/a/b/ *.py; cp x.py docs/", self.cwd)
        for locked, hit in (("src/models.py", True), ("srcx/a.py", False), ("models.py", True),
                            ("sub/models.py", False), ("docs/x.py", True), ("docs/y.py", False)):
            self.assertEqual(bool(writes.hits(os.path.join(self.cwd, locked))), hit, locked)
        folded = write_targets("rm README.md", self.cwd)
        self.assertTrue(folded.hits(os.path.join(self.cwd, "readme.md"), key=str.casefold))

    def test_git_undos_are_told_apart(self):
        """What git puts back as committed or staged undoes a write (the report after a call advises it)."""
        for command, restored in (("git checkout -- models.py", ["models.py/"]),
                                  ("git checkout HEAD -- models.py", ["models.py/"]),
                                  ("git checkout models.py", ["models.py/"]),
                                  ("git restore models.py", ["models.py/"]),
                                  ("git restore -s HEAD models.py", ["models.py/"]),
                                  ("git checkout main -- models.py", []), ("git restore --source=v1 models.py", []),
                                  ("git reset -- models.py", []), ("rm models.py", []),
                                  ("echo x > models.py; git checkout -- other.py", ["other.py/"])):
            with self.subTest(command=command):
                self.assertEqual(write_targets(command, self.cwd).restores, list(map(self.expected, restored)))


class AdversarialTest(unittest.TestCase):
    """Hostile text costs time linear in its length, never a crash, and the length is capped."""

    CASES = {
        "unclosed quotes": "echo '" + "a" * 200000,
        "unclosed double quotes": 'echo "' + "\\\"" * 100000,
        "deep substitutions": "$(" * 50000 + "rm x" + ")" * 50000,
        "deep subshells": "(" * 100000,
        "many backquotes": "`" * 200000,
        "many redirections": "echo " + "> a " * 50000,
        "many heredocs": "cat " + "<<E " * 20000 + "\n" + "E\n" * 20000,
        "nested bash -c": "bash -c " * 20000 + "'rm x'",
        "many words": "rm " + "a " * 100000,
        "braces": "rm " + "{a,b}" * 20000,
        "globs": "rm " + "*[" * 50000,
        "dollar soup": "$'\\" * 60000,
        "arithmetic": "$((" * 60000,
        "control bytes": "".join(chr(i % 256) for i in range(200000)),
        "newlines": "\n" * 200000,
        "long heredoc": "cat > f <<EOF\n" + "line > x\n" * 25000 + "EOF",
    }

    def test_bounded_time_and_no_crash(self):
        for name, text in self.CASES.items():
            with self.subTest(name):
                started = time.perf_counter()
                found = write_targets(text, "/tmp")
                spent = time.perf_counter() - started
                self.assertLess(spent, 2.0, f"{name}: {spent:.2f} s for {len(text)} characters")
                self.assertLessEqual(len(found.targets), 512)

    def test_too_long_is_unknown_not_read(self):
        found = write_targets("rm a.py; " + "x" * MAX_COMMAND, "/tmp")
        self.assertEqual((found.targets, found.unknown), ([], ["a command too long to read"]))

    def test_not_text(self):
        self.assertTrue(write_targets(None, "/tmp").unknown)


if __name__ == "__main__":
    unittest.main()
