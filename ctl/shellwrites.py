"""Which files a shell command will write, read from its text before it runs.

    write_targets("sed -i s/a/b/ x.py && cat y.py > z.py", "/proj")
      -> Writes(targets=[/proj/x.py, /proj/z.py], unknown=[], restores=[])

A PreToolUse hook denies a command whose targets another session has locked; whatever the text cannot
tell (a script, `python -c`, a formatter over a folder, a file named by a variable) is listed in
`unknown`, for the check after the call to catch. Commands that only read are never targets.

One pass over the text, recursing into `( … )`, `$( … )`, backquotes and `bash -c '…'` up to MAX_DEPTH;
here-documents are read a line at a time. Text longer than MAX_COMMAND is not read at all (unknown).
Nothing here runs, expands variables or walks directories: a glob stays a pattern, matched later
against the locked names.
"""
import os
import re
from collections import namedtuple

MAX_COMMAND = 256 * 1024
MAX_DEPTH = 6
MAX_TARGETS = 512
MAX_PATCH_FILE = 1 << 20            # a patch file named on the command line is read up to this size
NOT_FILES = {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/stdin", "/dev/tty", "-"}
PLAIN = re.compile(r"[^ \t\r\n;&|()<>\\'\"$`*?\[]+")
DQ_SPECIAL = re.compile(r'[\\"$`]')
REDIRECT = re.compile(r"(\d{1,3}|\{[A-Za-z_]\w*\})?(&>>|&>|>>|>\||>&|<<<|<<-|<<|<>|<&|>|<)")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
OUTPUT_OPS = {">", ">>", ">|", "&>", "&>>", "<>", ">&"}
VAR_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]")


class Target(namedtuple("Target", "path tree glob", defaults=(False, False))):
    """path: absolute, a shell pattern when `glob`; tree: the path and everything under it.
    Named tuples, not dataclasses: importing `dataclasses` would cost every Bash hook several milliseconds."""
    __slots__ = ()

    def hits(self, path: str, key=lambda p: p) -> bool:
        """Whether writing this target writes `path` (both compared through `key`, e.g. case folding)."""
        mine = key(self.path)
        if self.glob:
            pattern = _glob_regex(mine)
            return bool(pattern.fullmatch(path) or (self.tree and pattern.match(path) and
                                                    pattern.match(path).end() < len(path) and
                                                    path[pattern.match(path).end()] == "/"))
        return path == mine or (self.tree and path.startswith(mine.rstrip("/") + "/"))


class Writes(namedtuple("Writes", "targets unknown restores")):
    """targets: Target list; unknown: short phrases, what the text cannot tell; restores: the targets git puts
    back as committed or staged (`git checkout -- f`, `git restore f`), which undo a write rather than make one."""
    __slots__ = ()

    def hits(self, path: str, key=lambda p: p):
        return next((t for t in self.targets if t.hits(path, key)), None)

    def add(self, target: Target) -> None:
        if len(self.targets) >= MAX_TARGETS:
            self.note("more files than can be listed")
        elif target not in self.targets[-8:] and target not in self.targets:
            self.targets.append(target)

    def note(self, why: str) -> None:
        why = "".join(c if c.isprintable() else "?" for c in why[:80])
        if why not in self.unknown and len(self.unknown) < 16:
            self.unknown.append(why)


def _glob_regex(pattern: str):
    """A shell pattern as a regex over whole paths: `*` and `?` never cross `/`."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body[:1] in "!^" else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out))
    except re.error:
        return re.compile(re.escape(pattern))


def write_targets(command: str, cwd: str) -> Writes:
    """The files `command`, run in `cwd`, will write, and what about it cannot be told from its text."""
    writes = Writes([], [], [])
    if not isinstance(command, str) or len(command) > MAX_COMMAND:
        writes.note("a command too long to read")
        return writes
    _Parser(command, writes, 0).run(cwd)
    return writes


class Word:
    __slots__ = ("text", "pattern", "dynamic", "globby", "quoted")

    def __init__(self):
        self.text, self.pattern = [], []
        self.dynamic = self.globby = self.quoted = False

    def literal(self, chars: str, quoted: bool) -> None:
        self.text.append(chars)
        self.pattern.append(re.sub(r"([*?\[])", r"[\1]", chars) if quoted else chars)
        if quoted:
            self.quoted = True

    def done(self):
        self.text, self.pattern = "".join(self.text), "".join(self.pattern)
        return self

    @staticmethod
    def of(text: str):
        word = Word()
        word.literal(text, True)
        return word.done()


class Command:
    """words; redirects: (operator, Word or here-document body list); cwd: str, or None when a `cd` went
    somewhere the parser cannot follow; stdin: here-document or here-string text that feeds the command."""
    __slots__ = ("words", "redirects", "cwd", "stdin")

    def __init__(self, words: list, redirects: list, cwd, stdin=None):
        self.words, self.redirects, self.cwd, self.stdin = words, redirects, cwd, stdin


class _Parser:
    def __init__(self, text: str, writes: Writes, depth: int):
        self.s, self.i, self.n = text, 0, len(text)
        self.writes, self.depth = writes, depth
        self.ends = []                  # closers of the lists being read: ")" or "`"
        self.heredocs = []              # (delimiter, strip tabs, body list) waiting for the next newline
        self.pending = []               # commands that wait for their here-document bodies
        self.cwd = None

    def run(self, cwd):
        self.cwd = cwd
        self.parse_list(None)
        self.read_heredocs()
        self.flush()

    # -- reading

    def skip_blank(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "\\" and s.startswith("\\\n", self.i):
                self.i += 2
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = n if end == -1 else end
            else:
                return

    def parse_list(self, end) -> None:
        """Commands joined by ; && || | & and newlines, up to `end` (or the end of the text)."""
        s = self.s
        if end:
            self.ends.append(end)
        try:
            while True:
                self.skip_blank()
                if self.i >= self.n:
                    return
                c = s[self.i]
                if end and c == end:
                    self.i += 1
                    return
                if c == "\n":
                    self.i += 1
                    self.read_heredocs()
                    self.flush()
                elif c in ";&|" and not s.startswith("&>", self.i):
                    self.i += 1
                elif c == ")":
                    self.i += 1                         # a case pattern's, or stray: nothing runs
                elif c == "(":
                    if s.startswith("((", self.i):
                        self.skip_arithmetic(self.i + 2)
                    else:
                        self.i += 1
                        self.nested(")")
                else:
                    before = self.i
                    self.parse_command()
                    if self.i == before:
                        self.i += 1                     # never stand still on text no rule reads
        finally:
            if end:
                self.ends.pop()

    def nested(self, end) -> None:
        """A subshell or substitution: its commands run, and its `cd` stays inside."""
        if self.depth + len(self.ends) >= MAX_DEPTH:
            self.writes.note("commands nested too deep to read")
            self.skip_to(end)
            return
        saved = self.cwd
        self.parse_list(end)
        self.cwd = saved

    def skip_to(self, end) -> None:
        """Past the closer of a construct too deep to read (counting nested openers, ignoring quotes)."""
        opener = "(" if end == ")" else None
        level, s = 1, self.s
        while self.i < self.n:
            c = s[self.i]
            self.i += 1
            if c == opener:
                level += 1
            elif c == end:
                level -= 1
                if level == 0:
                    return

    def skip_arithmetic(self, start: int) -> None:
        level, i, s = 2, start, self.s
        while i < self.n and level:
            level += {"(": 1, ")": -1}.get(s[i], 0)
            i += 1
        self.i = i

    def at_command_end(self) -> bool:
        if self.i >= self.n:
            return True
        c = self.s[self.i]
        if c in "\n;|)" or (c == "&" and not self.s.startswith("&>", self.i)):
            return True
        return bool(self.ends) and c == self.ends[-1]

    def parse_command(self) -> None:
        s = self.s
        words, redirects, in_test = [], [], False
        stdin = None
        while True:
            self.skip_blank()
            if in_test and (s.startswith(("&&", "||"), self.i) or s[self.i:self.i + 1] in ("<", ">")):
                self.i += 1 if s[self.i] in "<>" else 2     # inside [[ ]]: part of the test
                continue
            if self.at_command_end():
                break
            if s[self.i] == "(":
                if words and s[self.i + 1:self.i + 2] == ")":
                    self.i += 2                     # `name()`: a function's body follows; read it as run
                break
            if not in_test and not s.startswith(("<(", ">("), self.i):
                match = REDIRECT.match(s, self.i)
                if match:
                    self.i = match.end()
                    operator = match.group(2)
                    if operator in ("<<", "<<-"):
                        body = []
                        self.skip_blank()               # `<< 'EOF'`, as agents write it: the word after blanks
                        delimiter = self.read_word()
                        if delimiter is not None:
                            self.heredocs.append((delimiter.text, operator == "<<-", body, delimiter.quoted))
                        redirects.append(("<<", body))
                        continue
                    self.skip_blank()
                    target = self.read_word()
                    if target is None:
                        continue
                    if operator == "<<<":
                        stdin = target.text
                    elif operator in (">&", "<&") and (target.text.isdigit() or target.text == "-"):
                        pass                        # a descriptor duplicated: no file
                    elif operator != "<&":
                        redirects.append((operator, target))
                    continue
            word = self.read_word()
            if word is None:
                break
            words.append(word)
            if word.text == "[[" and len(words) == 1 and not word.quoted:
                in_test = True                      # < and > compare strings inside [[ ]]
            elif word.text == "]]" and not word.quoted:
                in_test = False
        if not words and not redirects:
            return
        command = Command(words, redirects, self.cwd, stdin)
        if any(op == "<<" for op, _ in redirects):
            self.pending.append(command)            # analysed once its here-document is read
        else:
            self.analyse(command)

    def read_heredocs(self) -> None:
        s = self.s
        for delimiter, strip, body, quoted in self.heredocs:
            while self.i < self.n:
                end = s.find("\n", self.i)
                end = self.n if end == -1 else end
                line = s[self.i:end]
                self.i = min(end + 1, self.n)
                if (line.lstrip("\t") if strip else line) == delimiter:
                    break
                body.append(line)
            if not quoted and any("$(" in line or "`" in line for line in body):
                self.writes.note("a here-document that runs commands")
        self.heredocs = []

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for command in pending:
            body = next((b for op, b in command.redirects if op == "<<"), None)
            if body is not None and command.stdin is None:
                command.stdin = "\n".join(body)
            self.analyse(command)

    def read_word(self):
        """One shell word: quotes removed, substitutions run (read recursively), variables marked dynamic."""
        s, n = self.s, self.n
        word = Word()
        start = self.i
        if s.startswith(("<(", ">("), self.i):
            self.i += 2
            self.nested(")")
            word.dynamic = True
            return word.done()
        closer = self.ends[-1] if self.ends else None
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n;&|()<>" or (c == closer == "`"):
                break
            match = PLAIN.match(s, self.i)
            if match:
                word.literal(match.group(), False)
                self.i = match.end()
            elif c in "*?[":
                word.literal(c, False)
                word.globby = True
                self.i += 1
            elif c == "\\":
                word.literal(s[self.i + 1:self.i + 2], True)
                self.i += 2
            elif c == "'":
                end = s.find("'", self.i + 1)
                end = n if end == -1 else end
                word.literal(s[self.i + 1:end], True)
                self.i = end + 1
            elif c == '"':
                self.i += 1
                self.read_double_quoted(word)
            elif c == "$":
                self.read_dollar(word)
            elif c == "`":
                self.i += 1
                self.nested("`")
                word.dynamic = True
            else:
                word.literal(c, False)
                self.i += 1
        if self.i == start:
            return None
        return word.done()

    def read_double_quoted(self, word: Word) -> None:
        s, n = self.s, self.n
        word.quoted = True
        while self.i < n:
            match = DQ_SPECIAL.search(s, self.i)
            if match is None:
                word.literal(s[self.i:], True)
                self.i = n
                return
            word.literal(s[self.i:match.start()], True)
            self.i = match.start()
            c = s[self.i]
            if c == '"':
                self.i += 1
                return
            if c == "\\":
                nxt = s[self.i + 1:self.i + 2]
                word.literal(nxt if nxt in '$`"\\' else ("" if nxt == "\n" else "\\" + nxt), True)
                self.i += 2
            elif c == "$":
                self.read_dollar(word)
            else:
                self.i += 1
                self.nested("`")
                word.dynamic = True

    def read_dollar(self, word: Word) -> None:
        s = self.s
        nxt = s[self.i + 1:self.i + 2]
        if nxt == "'":
            end, self.i = self.i + 2, self.i + 2
            while end < self.n and s[end] != "'":
                end += 2 if s[end] == "\\" else 1
            raw = s[self.i:end]
            word.literal(re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), raw), True)
            self.i = end + 1
        elif s.startswith("$((", self.i):
            self.skip_arithmetic(self.i + 3)
            word.dynamic = True
        elif nxt == "(":
            self.i += 2
            self.nested(")")
            word.dynamic = True
        elif nxt == "{":
            end = s.find("}", self.i)
            self.i = self.n if end == -1 else end + 1
            word.dynamic = True
        else:
            match = VAR_START.match(s, self.i + 1)
            if match:
                self.i = match.end()
                word.dynamic = True
            else:
                word.literal("$", False)
                self.i += 1

    # -- what a command does

    def analyse(self, command: Command) -> None:
        for operator, target in command.redirects:
            if operator in OUTPUT_OPS:
                self.target(target, command.cwd)
        words = command.words
        while words and ASSIGNMENT.match(words[0].text) and not words[0].text.startswith(("'", '"')):
            words = words[1:]
        while words and not words[0].quoted and words[0].text in KEYWORDS:
            words = words[1:]
        if not words or (not words[0].quoted and words[0].text in DECLARATIONS):
            return
        self.run_words(words, command, 0)

    def run_words(self, words: list, command: Command, hops: int) -> None:
        head = words[0]
        if head.dynamic:
            self.writes.note("a command named by a variable")
            return
        name = os.path.basename(head.text)
        if name in WRAPPERS and hops < 8:
            rest = _strip_wrapper(WRAPPERS[name], words[1:])
            if rest:
                self.run_words(rest, command, hops + 1)
            return
        handler = HANDLERS.get(name)
        if handler is not None:
            handler(self, words[1:], command)
        elif name not in READ_ONLY:
            self.writes.note(f"{name} runs a program")

    def target(self, word: Word, cwd, tree: bool = False) -> None:
        if word.dynamic:
            self.writes.note("a file named by a variable or a command")
            return
        text = word.text
        if text in NOT_FILES or text.startswith(("/dev/fd/", "/proc/self/fd/")) or not text:
            return
        if text.startswith("~") and not word.quoted:
            text = os.path.expanduser(text)
        if not os.path.isabs(text) and cwd is None:
            self.writes.note("a path relative to a folder the parser cannot follow")
            return
        if word.globby:
            pattern = word.pattern if os.path.isabs(text) else os.path.join(cwd, word.pattern)
            self.writes.add(Target(os.path.normpath(pattern), tree, True))
            return
        for alternative in _braces(text) if not word.quoted else (text,):
            self.writes.add(Target(os.path.normpath(os.path.join(cwd or "/", alternative)), tree))

    def nested_script(self, script: str, cwd) -> None:
        """`bash -c '…'`, `eval …`, a here-document fed to a shell: read as commands, one level deeper."""
        if self.depth + 1 >= MAX_DEPTH:
            self.writes.note("commands nested too deep to read")
            return
        _Parser(script, self.writes, self.depth + 1).run(cwd)


def _braces(text: str) -> list:
    """`src/{a,b}.py` as its alternatives (one level, at most 64); anything else as itself."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    options = match.group(1).split(",")[:64]
    return [text[:match.start()] + option + text[match.end():] for option in options]


# ---------------------------------------------------------------- option parsing


def _operands(args: list, takes_value: str = "", long_values=(), stop_at_first=False):
    """(options as (name, value) pairs, operands), GNU style: clusters, `--name=value`, `--`."""
    options, operands, i = [], [], 0
    while i < len(args):
        word = args[i]
        text = word.text
        if word.quoted or word.dynamic or not text.startswith("-") or text == "-":
            operands.append(word)
            if stop_at_first:
                operands.extend(args[i + 1:])
                break
        elif text == "--":
            operands.extend(args[i + 1:])
            break
        elif text.startswith("--"):
            name, eq, value = text.partition("=")
            if not eq and name in long_values and i + 1 < len(args):
                i += 1
                value = args[i].text
            options.append((name, value))
        else:
            for k, letter in enumerate(text[1:], 1):
                if letter in takes_value:
                    value = text[k + 1:]
                    if not value and i + 1 < len(args):
                        i += 1
                        value = args[i].text
                    options.append(("-" + letter, value))
                    break
                options.append(("-" + letter, ""))
        i += 1
    return options, operands


def _has(options, *names) -> bool:
    return any(name in names for name, _ in options)


def _value(options, *names):
    return next((value for name, value in options if name in names), None)


def _strip_wrapper(spec, args: list) -> list:
    """What a prefix such as `sudo -u x`, `env A=1`, `timeout 5`, `nice -n 5` runs."""
    takes_value, positional = spec
    i = 0
    while i < len(args) and args[i].text.startswith("-") and not args[i].quoted and args[i].text != "-":
        text = args[i].text
        if text == "--":
            i += 1
            break
        if not text.startswith("--") and text[-1] in takes_value and len(text) == 2:
            i += 1
        i += 1
    while i < len(args) and ASSIGNMENT.match(args[i].text) and not args[i].quoted:
        i += 1
    return args[i + positional:]


# ---------------------------------------------------------------- commands


def _each_operand(recursive_flags="", takes_value="", long_values=(), skip_first=False):
    """Every operand is written (rm, touch, truncate, tee, chmod …); `recursive_flags` make it a tree."""
    def handler(parser, args, command):
        options, operands = _operands(args, takes_value, long_values)
        tree = any(name in recursive_flags.split() for name, _ in options)
        if skip_first and not _has(options, "--reference"):
            operands = operands[1:]
        for word in operands:
            parser.target(word, command.cwd, tree)
    return handler


def _copy_like(moves: bool, takes_value: str, long_values=()):
    """cp, mv, ln, install: the destination (or DIR/name for each source); mv also empties its sources."""
    def handler(parser, args, command):
        options, operands = _operands(args, takes_value, long_values)
        if takes_value == INSTALL_VALUES and _has(options, "-d", "--directory"):
            for word in operands:                   # install -d makes folders
                parser.target(word, command.cwd, True)
            return
        tree = moves or _has(options, "-r", "-R", "-a", "--recursive", "--archive")
        directory = _value(options, "-t", "--target-directory")
        sources = operands
        if directory is None and len(operands) >= 2:
            destination, sources = operands[-1], operands[:-1]
            into = (len(sources) > 1 or destination.text.endswith("/") or
                    (not _has(options, "-T", "--no-target-directory") and command.cwd is not None and not
                     destination.dynamic and os.path.isdir(os.path.join(command.cwd, destination.text))))
            if not into:
                parser.target(destination, command.cwd, tree)
            else:
                directory = destination
        if directory is not None:
            base = directory if isinstance(directory, Word) else Word.of(directory)
            for source in sources:
                if source.dynamic or base.dynamic:
                    parser.writes.note("a file named by a variable or a command")
                    continue
                inside = Word.of(os.path.join(base.text, os.path.basename(source.text.rstrip("/"))))
                inside.globby = source.globby
                inside.pattern = os.path.join(base.pattern, os.path.basename(source.pattern.rstrip("/")))
                parser.target(inside, command.cwd, tree)
        if moves:
            for source in sources:
                parser.target(source, command.cwd, True)
    return handler


INSTALL_VALUES = "mogtS"


def _dd(parser, args, command):
    for word in args:
        if word.text.startswith("of="):
            rest = Word.of(word.text[3:])
            rest.dynamic = word.dynamic
            parser.target(rest, command.cwd)


def _sed(parser, args, command):
    in_place, scripts, operands, i = False, [], [], 0
    while i < len(args):
        text = args[i].text
        if args[i].quoted or args[i].dynamic or not text.startswith("-") or text == "-":
            operands.append(args[i])
        elif text == "--":
            operands.extend(args[i + 1:])
            break
        elif text.startswith("--"):
            name, eq, value = text.partition("=")
            in_place |= name == "--in-place"
            if name in ("--expression", "--file"):
                if not eq and i + 1 < len(args):
                    i += 1
                    value = args[i].text
                scripts.append(value)
        else:
            for k, letter in enumerate(text[1:], 1):
                if letter == "i":
                    in_place = True
                    if text[k + 1:] == "" and i + 1 < len(args) and args[i + 1].quoted and not args[i + 1].text:
                        i += 1                      # BSD sed: -i '' (no backup)
                    break                           # the rest of the cluster is a backup suffix
                if letter in "efl":
                    value = text[k + 1:]
                    if not value and i + 1 < len(args):
                        i += 1
                        value = args[i].text
                    if letter in "ef":
                        scripts.append(value)
                    break
        i += 1
    if not scripts and operands:
        scripts.append(operands[0].text)
        operands = operands[1:]
    if any(re.search(r"(^|[;\n}/0-9$])\s*[wW]\s+\S|/[gpIi0-9]*w\s+\S|(^|[;\n])\s*e(\s|$)", s) for s in scripts):
        parser.writes.note("a sed script that writes or runs")
    if in_place:
        for word in operands:
            parser.target(word, command.cwd)


def _perl_like(parser, args, command):
    """perl / ruby: `-i[suffix]` edits its file operands in place; any other code is unknown."""
    in_place, code, operands, i = False, False, [], 0
    while i < len(args):
        text = args[i].text
        if args[i].quoted or args[i].dynamic or not text.startswith("-") or text == "-":
            operands = args[i:]
            break
        if text == "--":
            operands = args[i + 1:]
            break
        for k, letter in enumerate(text[1:], 1):
            if letter == "i":
                in_place = True
                break
            if letter in "eEIMmrx":
                if letter in "eE":
                    code = True
                if not text[k + 1:] and letter in "eEIr" and i + 1 < len(args):
                    i += 1
                break
        i += 1
    if not code and operands:
        operands = operands[1:]                     # the script file
        parser.writes.note(f"{os.path.basename(command.words[0].text)} runs a script")
    if in_place:
        for word in operands:
            parser.target(word, command.cwd)
    elif code:
        parser.writes.note(f"{os.path.basename(command.words[0].text)} runs code")


def _awk(parser, args, command):
    options, operands = _operands(args, "Ffvi", ())
    program = None if _has(options, "-f") else (operands.pop(0).text if operands else "")
    if _value(options, "-i") in ("inplace", "inplace.awk") or _has(options, "--inplace"):
        for word in operands:
            parser.target(word, command.cwd)
    elif program is None or re.search(r"system\s*\(|print[f]?[^;}]*[>|]|\|\s*getline", program):
        parser.writes.note("an awk program that may write")


def _editor(parser, args, command):
    _, operands = _operands(args, "cSuUoOpwW")
    for word in operands:
        if not word.text.startswith("+"):
            parser.target(word, command.cwd)


def _patch_paths(text: str, strip) -> list:
    """The files a unified or context diff changes: its `+++` names (or `---` for a deletion)."""
    names, old = [], None
    for line in text.splitlines()[:200000]:
        if line.startswith("--- "):
            old = line[4:].split("\t")[0].strip()
        elif line.startswith("+++ "):
            new = line[4:].split("\t")[0].strip()
            name = old if new == "/dev/null" else new
            if name and name != "/dev/null":
                names.append(name)
        elif line.startswith(("rename from ", "rename to ", "copy to ")):
            names.append("b/" + line.split(" ", 2)[2] if strip == 1 else line.split(" ", 2)[2])
    stripped = []
    for name in names:
        parts = name.split("/")
        if strip is None:
            stripped.extend([name, parts[-1]])
        else:
            stripped.append("/".join(parts[strip:]) or parts[-1])
    return stripped


def _read_patch_file(word: Word, cwd):
    if word.dynamic or cwd is None:
        return None
    try:
        with open(os.path.join(cwd, word.text), "rb") as handle:
            return handle.read(MAX_PATCH_FILE).decode("utf-8", "replace")
    except OSError:
        return None


def _apply_patch_text(parser, text, strip, cwd) -> None:
    if text is None:
        parser.writes.note("a patch whose changes the parser cannot see")
        return
    for name in _patch_paths(text, strip):
        parser.target(Word.of(name), cwd)


def _strip_level(value):
    return int(value) if value is not None and value.isdigit() else None


def _patch(parser, args, command):
    options, operands = _operands(args, "pioDdBFrVzYg", ("--strip", "--input", "--output", "--directory"))
    if _has(options, "--dry-run"):
        return
    cwd = command.cwd
    directory = _value(options, "-d", "--directory")
    if directory is not None and cwd is not None:
        cwd = os.path.join(cwd, directory)
    output = _value(options, "-o", "--output")
    if output is not None:
        parser.target(Word.of(output), cwd)
        return
    if operands:
        parser.target(operands[0], cwd)
        return
    source = _value(options, "-i", "--input")
    text = _read_patch_file(Word.of(source), cwd) if source is not None else command.stdin
    _apply_patch_text(parser, text, _strip_level(_value(options, "-p", "--strip")), cwd)


def _chdir(parser, args, command):
    _, operands = _operands(args)
    if not operands:
        parser.cwd = os.path.expanduser("~")
    elif operands[0].dynamic or operands[0].text == "-" or parser.cwd is None:
        parser.cwd = None
    else:
        parser.cwd = os.path.normpath(os.path.join(parser.cwd, os.path.expanduser(operands[0].text)))


def _popd(parser, args, command):
    parser.cwd = None


def _shell(parser, args, command):
    options, operands = _operands(args, "oO", (), stop_at_first=True)
    if _has(options, "-c"):
        if not operands or operands[0].dynamic:
            parser.writes.note("a shell running computed text")
        else:
            parser.nested_script(operands[0].text, command.cwd)
    elif operands:
        parser.writes.note(f"{os.path.basename(command.words[0].text)} runs a script")
    elif command.stdin is not None:
        parser.nested_script(command.stdin, command.cwd)
    else:
        parser.writes.note("a shell reading commands from input")


def _eval(parser, args, command):
    if any(word.dynamic for word in args):
        parser.writes.note("eval of computed text")
    else:
        parser.nested_script(" ".join(word.text for word in args), command.cwd)


def _xargs(parser, args, command):
    i = 0
    while i < len(args) and args[i].text.startswith("-") and not args[i].quoted:
        text = args[i].text
        if len(text) == 2 and text[1] in "IiLlnPsdEa":
            i += 1
        i += 1
    rest = args[i:]
    if not rest:
        return
    name = os.path.basename(rest[0].text)
    if name in READ_ONLY and name not in HANDLERS:
        return
    parser.run_words(rest, command, 1)
    if name not in READ_ONLY:
        parser.writes.note(f"xargs {name}: names come from input")


def _find(parser, args, command):
    for k, word in enumerate(args):
        text = word.text
        if text in ("-delete",):
            parser.writes.note("find -delete")
        elif text in ("-fprint", "-fprint0", "-fprintf", "-fls") and k + 1 < len(args):
            parser.target(args[k + 1], command.cwd)
        elif text in ("-exec", "-execdir", "-ok", "-okdir") and k + 1 < len(args):
            name = os.path.basename(args[k + 1].text)
            if name not in READ_ONLY or name in HANDLERS:
                parser.writes.note(f"find {text} {name}")


def _sort(parser, args, command):
    options, _ = _operands(args, "kotST", ("--key", "--output", "--field-separator", "--buffer-size",
                                            "--temporary-directory"))
    output = _value(options, "-o", "--output")
    if output is not None:
        parser.target(Word.of(output), command.cwd)


def _uniq(parser, args, command):
    _, operands = _operands(args, "fsw", ("--skip-fields", "--skip-chars", "--check-chars"))
    if len(operands) >= 2:
        parser.target(operands[1], command.cwd)


def _curl(parser, args, command):
    value_letters = "dHXuAeFTwxmKEbrCYyzQ"
    i = 0
    while i < len(args):
        text = args[i].text
        following = args[i + 1] if i + 1 < len(args) else None
        if text.startswith("--"):
            name, eq, value = text.partition("=")
            if name in ("--output", "--dump-header", "--cookie-jar", "--trace", "--trace-ascii"):
                target = Word.of(value) if eq else following
                if target is not None:
                    parser.target(target, command.cwd)
                i += 0 if eq else 1
            elif name in ("--remote-name", "--remote-name-all"):
                parser.writes.note("curl names its file from the URL")
        elif text.startswith("-") and len(text) > 1 and not args[i].quoted:
            for k, letter in enumerate(text[1:], 1):
                if letter in "oDc":
                    rest = text[k + 1:]
                    target = Word.of(rest) if rest else following
                    if target is not None:
                        parser.target(target, command.cwd)
                    i += 0 if rest else 1
                    break
                if letter == "O":
                    parser.writes.note("curl names its file from the URL")
                elif letter in value_letters:
                    i += 0 if text[k + 1:] else 1
                    break
        i += 1


def _wget(parser, args, command):
    options, _ = _operands(args, "OoaPtTUeQ", ("--output-document", "--output-file", "--append-output"))
    document = _value(options, "-O", "--output-document")
    for log in (_value(options, "-o", "--output-file"), _value(options, "-a", "--append-output")):
        if log:
            parser.target(Word.of(log), command.cwd)
    if document is not None:
        parser.target(Word.of(document), command.cwd)
    elif not _has(options, "--spider"):
        parser.writes.note("wget names its file from the URL")


def _tar(parser, args, command):
    first = args[0].text if args else ""
    letters = first if first and not first.startswith("-") else ""
    options, _ = _operands(args[1:] if letters else args, "fCTXbHK", ("--file", "--directory"))
    flags = set(letters) | {name.lstrip("-")[:1] for name, _ in options if not name.startswith("--")}
    if "x" in flags or _has(options, "--extract", "--get"):
        if not _has(options, "-O", "--to-stdout"):
            parser.writes.note("tar extracts files")
        return
    archive = _value(options, "-f", "--file")
    if archive is None and "f" in letters and len(args) > 1:
        archive = args[1].text
    if archive is not None and (flags & set("cruA") or _has(options, "--create", "--append", "--update")):
        parser.target(Word.of(archive), command.cwd)


def _compressor(parser, args, command):
    options, operands = _operands(args, "S", ("--suffix",))
    if _has(options, "-c", "--stdout", "--to-stdout", "-l", "--list", "-t", "--test"):
        return
    name = os.path.basename(command.words[0].text)
    for word in operands:                           # the file goes, and its (de)compressed twin appears
        parser.target(word, command.cwd)
        if not word.dynamic and name in COMPRESSED_SUFFIX:
            parser.target(Word.of(word.text + COMPRESSED_SUFFIX[name]), command.cwd)


COMPRESSED_SUFFIX = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz"}


def _xxd(parser, args, command):
    _, operands = _operands(args, "cglosn", ())
    if len(operands) >= 2:
        parser.target(operands[1], command.cwd)


def _remote_copy(parser, args, command):
    _, operands = _operands(args, "eiPpFoJlc", ("--exclude", "--include", "--rsh"))
    if len(operands) >= 2 and ":" not in operands[-1].text:
        parser.target(operands[-1], command.cwd, True)


def _formatter(trigger: str = ""):
    """A formatter rewrites its file operands (when `trigger`, e.g. -w, is given); folders are unknown."""
    def handler(parser, args, command):
        options, operands = _operands(args)
        if _has(options, "--check", "--diff", "-l", "--list-different", "-d"):
            return
        if trigger and not _has(options, *trigger.split()):
            return
        name = os.path.basename(command.words[0].text)
        for word in operands or ([Word.of(".")] if not trigger else []):
            path = None if word.dynamic or command.cwd is None else os.path.join(command.cwd, word.text)
            if path is not None and os.path.isfile(path):
                parser.target(word, command.cwd)
            elif path is None or os.path.isdir(path) or word.globby:
                parser.writes.note(f"{name} formats a folder")
    return handler


def _ruff(parser, args, command):
    if args and args[0].text == "format":
        _formatter()(parser, args[1:], command)
    elif args and args[0].text == "check" and any(a.text in ("--fix", "--unsafe-fixes") for a in args):
        _formatter("--fix")(parser, args[1:], command)


# -- git

GIT_READ = {"status", "diff", "log", "show", "blame", "branch", "remote", "fetch", "config", "rev-parse", "ls-files",
            "ls-tree", "grep", "describe", "tag", "shortlog", "reflog", "cat-file", "help", "version", "rev-list",
            "show-ref", "for-each-ref", "merge-base", "name-rev", "count-objects", "fsck", "gc", "add", "commit",
            "push", "notes", "init", "clone", "var", "check-ignore", "format-patch", "range-diff", "whatchanged",
            "annotate", "diff-tree", "diff-index", "diff-files", "hash-object", "mktree", "write-tree",
            "update-index", "prune", "repack", "maintenance", "credential", "archive", "bundle", "instaweb", "blame"}
GIT_WORKTREE = {"switch", "merge", "rebase", "pull", "cherry-pick", "revert", "am", "clean", "checkout-index",
                "read-tree", "submodule", "sparse-checkout", "worktree", "filter-branch", "bisect", "stash"}
GIT_STASH_READS = {"list", "show"}


def _git_paths(parser, paths, cwd, restores=False) -> None:
    before = len(parser.writes.targets)
    for word in paths:
        parser.target(word, cwd, True)
    if restores:
        parser.writes.restores.extend(parser.writes.targets[before:])


def _existing(word: Word, cwd) -> bool:
    return not word.dynamic and cwd is not None and (word.globby or os.path.lexists(os.path.join(cwd, word.text)))


def _git(parser, args, command):
    cwd, i = command.cwd, 0
    while i < len(args) and args[i].text.startswith("-") and not args[i].quoted:
        text = args[i].text
        if text in ("-C", "-c", "--git-dir", "--work-tree", "--namespace", "--exec-path") and i + 1 < len(args):
            if text == "-C":
                cwd = None if args[i + 1].dynamic or cwd is None else os.path.join(cwd, args[i + 1].text)
            i += 1
        i += 1
    if i >= len(args):
        return
    sub, rest = args[i].text, args[i + 1:]
    if sub in GIT_READ:
        if sub == "archive":
            options, _ = _operands(rest, "o", ("--output",))
            if _value(options, "-o", "--output"):
                parser.target(Word.of(_value(options, "-o", "--output")), cwd)
        return
    if sub == "stash" and rest and rest[0].text in GIT_STASH_READS:
        return
    if sub in GIT_WORKTREE:
        parser.writes.note(f"git {sub} rewrites the work tree")
        return
    handler = GIT_PATH_COMMANDS.get(sub)
    if handler is None:
        parser.writes.note(f"git {sub} (an alias or a command the parser does not know)")
        return
    handler(parser, rest, cwd, command.stdin)


def _git_checkout(parser, rest, cwd, stdin):
    split = next((k for k, w in enumerate(rest) if w.text == "--" and not w.quoted), None)
    options, operands = _operands(rest[:split] if split is not None else rest, "bBU", ("--orphan", "--conflict"))
    if split is not None:
        _git_paths(parser, rest[split + 1:], cwd, restores=[w.text for w in operands] in ([], ["HEAD"]))
        return
    switches = _has(options, "-b", "-B", "--orphan", "--detach") or (operands and not _existing(operands[0], cwd))
    if switches:
        parser.writes.note("git checkout switches branches, rewriting the work tree")
        operands = operands[1:]
    _git_paths(parser, [w for w in operands if _existing(w, cwd)], cwd, restores=not switches)


def _git_restore(parser, rest, cwd, stdin):
    options, operands = _operands(rest, "s", ("--source",))
    _git_paths(parser, operands, cwd, restores=_value(options, "-s", "--source") in (None, "HEAD"))


def _git_reset(parser, rest, cwd, stdin):
    split = next((k for k, w in enumerate(rest) if w.text == "--" and not w.quoted), None)
    options, operands = _operands(rest[:split] if split is not None else rest)
    if _has(options, "--hard", "--merge", "--keep"):
        parser.writes.note("git reset rewrites the work tree")
    paths = rest[split + 1:] if split is not None else [w for w in operands if _existing(w, cwd)]
    _git_paths(parser, paths, cwd)


def _git_rm(parser, rest, cwd, stdin):
    _, operands = _operands(rest)
    _git_paths(parser, operands, cwd)


def _git_mv(parser, rest, cwd, stdin):
    _copy_like(True, "")(parser, rest, Command([Word.of("mv")], [], cwd))


def _git_apply(parser, rest, cwd, stdin):
    options, operands = _operands(rest, "p", ("--directory", "--exclude", "--include"))
    if _has(options, "--check", "--stat", "--numstat", "--summary"):
        return
    directory = _value(options, "--directory")
    if directory and cwd is not None:
        cwd = os.path.join(cwd, directory)
    strip = _strip_level(_value(options, "-p"))
    strip = 1 if strip is None else strip
    if not operands:
        _apply_patch_text(parser, stdin, strip, cwd)
    for word in operands:
        _apply_patch_text(parser, _read_patch_file(word, cwd), strip, cwd)


GIT_PATH_COMMANDS = {"checkout": _git_checkout, "restore": _git_restore, "reset": _git_reset, "rm": _git_rm,
                     "mv": _git_mv, "apply": _git_apply}


READ_ONLY = {
    "cat", "tac", "less", "more", "head", "tail", "grep", "egrep", "fgrep", "rg", "ag", "ack", "ls", "dir", "tree",
    "wc", "cut", "tr", "nl", "od", "hexdump", "strings", "file", "stat", "du", "df", "pwd", "echo", "printf", "true",
    "false", "test", "[", "[[", "]]", "which", "type", "whereis", "whoami", "id", "date", "cal", "uname", "hostname",
    "printenv", "basename", "dirname", "realpath", "readlink", "diff", "cmp", "comm", "sleep", "ps", "pgrep", "kill",
    "jobs", "wait", "history", "alias", "unalias", "export", "set", "unset", "shift", "return", "exit", "break",
    "continue", "read", "umask", "getopts", "hash", "trap", "jq", "yq", "column", "fold", "fmt", "expand",
    "unexpand", "paste", "join", "look", "md5sum", "sha1sum", "sha256sum", "sha512sum", "b2sum", "cksum", "sum",
    "base64", "base32", "seq", "yes", "nproc", "free", "uptime", "lsof", "top", "man", "info", "tput", "clear",
    "tty", "locale", "numfmt", "bc", "expr", "factor", "ping", "dig", "host", "nslookup", ":", "rev", "ssh",
    "mktemp", "command", "xdg-open", "open", "pstree", "sha224sum", "sha384sum", "fc", "shopt", "disown",
    "bg", "fg", "let", "caller", "compgen", "complete", "lsblk", "findmnt", "getent", "groups", "who", "w",
    "last", "vmstat", "iostat", "journalctl", "systemctl", "cut", "iconv", "zcat", "bzcat", "xzcat",
    "zgrep", "zless", "view", "pidof", "killall", "pkill"}
KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "esac", "time",
            "coproc"}
DECLARATIONS = {"for", "select", "case", "function", "in", "declare", "typeset", "local", "readonly"}
WRAPPERS = {                # name -> (short options that take a value, positional words before the command)
    "sudo": ("ugCDhprtUT", 0), "doas": ("uC", 0), "env": ("uCS", 0), "nice": ("n", 0), "ionice": ("cnpP", 0),
    "nohup": ("", 0), "timeout": ("sk", 1), "stdbuf": ("ioe", 0), "exec": ("a", 0), "builtin": ("", 0),
    "chronic": ("", 0), "unbuffer": ("", 0), "caffeinate": ("tw", 0), "chrt": ("", 1),
    "taskset": ("", 1), "setsid": ("", 0), "flock": ("wEs", 1), "strace": ("eopsu", 0), "ltrace": ("eopsu", 0),
}
HANDLERS = {
    "rm": _each_operand("-r -R --recursive"), "shred": _each_operand(takes_value="ns"), "unlink": _each_operand(),
    "rmdir": _each_operand(), "truncate": _each_operand(takes_value="sr", long_values=("--size", "--reference")),
    "touch": _each_operand(takes_value="dtr", long_values=("--date", "--reference")),
    "mkdir": _each_operand(takes_value="m", long_values=("--mode",)),
    "tee": _each_operand(), "chmod": _each_operand("-R --recursive", skip_first=True),
    "chown": _each_operand("-R --recursive", skip_first=True), "chgrp": _each_operand("-R --recursive", skip_first=True),
    "cp": _copy_like(False, "tS", ("--target-directory", "--suffix")),
    "mv": _copy_like(True, "tS", ("--target-directory", "--suffix")),
    "ln": _copy_like(False, "tS", ("--target-directory", "--suffix")),
    "install": _copy_like(False, INSTALL_VALUES, ("--mode", "--owner", "--group", "--target-directory", "--suffix")),
    "dd": _dd, "sed": _sed, "gsed": _sed, "perl": _perl_like, "ruby": _perl_like, "awk": _awk, "gawk": _awk,
    "ed": _editor, "ex": _editor, "vi": _editor, "vim": _editor, "nvim": _editor, "nano": _editor, "emacs": _editor,
    "patch": _patch, "cd": _chdir, "pushd": _chdir, "popd": _popd,
    "bash": _shell, "sh": _shell, "zsh": _shell, "dash": _shell, "ksh": _shell, "eval": _eval,
    "xargs": _xargs, "find": _find, "sort": _sort, "uniq": _uniq, "curl": _curl, "wget": _wget, "tar": _tar,
    "gzip": _compressor, "bzip2": _compressor, "xz": _compressor, "gunzip": _compressor, "xxd": _xxd,
    "rsync": _remote_copy, "scp": _remote_copy, "git": _git,
    "black": _formatter(), "isort": _formatter(), "rustfmt": _formatter(), "gofmt": _formatter("-w"),
    "goimports": _formatter("-w"), "clang-format": _formatter("-i"), "shfmt": _formatter("-w"),
    "autopep8": _formatter("-i --in-place"), "yapf": _formatter("-i --in-place"),
    "prettier": _formatter("-w --write"), "ruff": _ruff,
}
