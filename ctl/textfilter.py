"""The content filter: screens free text that peers write, with three outcomes.

- refuse (422 naming the rule): unambiguous structure that only an injection or a leak needs: tool-call and
  function-result markup, chat-turn markers, system-reminder-style tags, data: URIs of HTML or script (SVG
  with handlers too), ANSI escape codes and other control characters (CRLF line ends are text),
  hidden text (tag characters, bidi overrides, invisible characters splitting a keyword), secrets;
- flag (delivered, marked with the rule, shown to the human): what honest text also contains now and then:
  plain-language instruction overrides (in several languages, spaced out, leetspeak), persona role-play, role
  words that may be turn markers, provenance imitation, remote images (inline, by reference, srcset, CSS),
  HTML comments addressed to an agent, long base64 runs, JSON shaped like a tool call;
- pass: everything else, byte for byte.

Detection runs on a normalized copy (entities and percent-escapes decoded, base64 SVG decoded, CRLF read as LF,
NFKC, case and look-alikes folded, invisible characters removed, white space collapsed); some rules also read its
letters alone (spaced-out or leetspeak words). What is stored and delivered is the original.
Every check is linear: quantifiers that could meet each other are bounded, white space is collapsed before
matching, and a rule whose gap would be rescanned from every start scans windows that never overlap (_Near).
"""
import base64
import html
import re
import unicodedata
import urllib.parse

from ctl.errors import ApiError

_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ɡ": "g", "ı": "i", "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i",
    "κ": "k", "τ": "t", "υ": "u", "χ": "x", "ε": "e", "ѵ": "v", "ո": "n", "ս": "u",
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "ᐸ": "<", "ᐳ": ">",
    "˂": "<", "˃": ">", "❮": "<", "❯": ">", "‐": "-", "‑": "-", "–": "-",
    "\u2028": "\n", "\u2029": "\n",
})
# Invisible to a reader: removed from the detection copy (they are legitimate inside emoji sequences and
# some scripts, so their presence alone is no offence; splitting a keyword with them is).
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2060-\u2064"
                        "\u206a-\u206f\u3164\u2800\ufe00-\ufe0f\ufeff\uffa0\U000e0100-\U000e01ef]")
_SPLIT_WORD = re.compile(f"[A-Za-z](?:{_INVISIBLE.pattern})+[A-Za-z]")
_BIDI_OVERRIDES = re.compile("[\u202a-\u202e\u2066-\u2069]")
# Tag characters are allowed only as the tail of an emoji subdivision flag (🏴 + tag letters + cancel tag).
_TAG_CHARS = re.compile("[\U000e0000-\U000e007f]")
_FLAG_TAGS = re.compile("\U0001f3f4[\U000e0020-\U000e007e]{1,16}\U000e007f")
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")     # CRLF line ends are text
_ANSI = re.compile("\x1b[\\[\\]()#;?0-9]")
_SURROGATES = re.compile("[\ud800-\udfff]")


class _Near:
    """`then` within `reach` characters after each `first` (matched there if `anchored`, else searched for). A window
    also ends where the next `first` starts, so windows never overlap and one pass over the text is enough: a
    regex with a bounded gap would rescan the gap from every start."""

    def __init__(self, first: str, then: str, reach: int, anchored: bool = True):
        self.first, self.then, self.reach, self.anchored = re.compile(first), re.compile(then), reach, anchored

    def search(self, text: str) -> bool:
        starts = [m.end() for m in self.first.finditer(text)] + [len(text)]
        look = self.then.match if self.anchored else self.then.search
        return any(look(text, begin, min(begin + self.reach, after)) for begin, after in zip(starts, starts[1:]))


class _AnyOf:
    def __init__(self, *patterns):
        self.patterns = patterns

    def search(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self.patterns)


class _CommentsSaying:
    """HTML comments (a renderer hides them, a model reads them) with words aimed at an agent. Scanned with
    str.find, comment after comment, so an unclosed one costs one pass, not one per opening."""

    def __init__(self, words: str):
        self.words = re.compile(words)

    def search(self, text: str) -> bool:
        start = text.find("<!--")
        while start != -1:
            end = text.find("-->", start + 4)
            if self.words.search(text, start + 4, len(text) if end == -1 else end):
                return True
            start = -1 if end == -1 else text.find("<!--", end + 3)
        return False


class _Squeezed:
    """A pattern matched on the letters and digits alone, leetspeak included: `i g n o r e`, `1gn0r3`,
    `i.g.n.o.r.e` all read as `ignore` to a model."""
    LEET = {"a": "a4@", "b": "b8", "e": "e3", "g": "g9", "i": "i1!|l", "l": "l1|i", "o": "o0", "s": "s5$", "t": "t7"}
    DROP = re.compile(r"[^a-z0-9@$!|]+")

    def __init__(self, phrase: str):
        """phrase: a regex over lower-case words; every letter becomes its class of leet spellings."""
        self.pattern = re.compile(re.sub(r"[a-z]", lambda m: f"[{self.LEET.get(m.group(), m.group())}]", phrase))

    def search(self, text: str) -> bool:
        return self.pattern.search(self.DROP.sub("", text)) is not None


class _Triggered:
    """A pattern that can match only where one of its leading words occurs: the words are looked for first,
    with str `in` (a fast scan), and the pattern runs only when one is there. Most honest text holds none."""

    def __init__(self, words: tuple, pattern):
        self.words = tuple(_folded(w) for w in words)
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern     # a regex or a rule

    def search(self, text: str) -> bool:
        return any(word in text for word in self.words) and bool(self.pattern.search(text))


def _folded(pattern: str) -> str:
    """A pattern in other scripts, spelled as the detection copy spells it (Cyrillic look-alikes folded)."""
    return pattern.translate(_LOOKALIKES)


_TOOL_WORDS = (r"(?:function_calls|function_results|invoke|tool_use|tool_result|tool_calls?|"
               r"function_call|tool_code|tool_response)")
# What may follow `human:` as a YAML key (a scalar ending the line, or nothing: a mapping), not a turn's prose.
_YAML_VALUE = (r"(?! ?(?:true|false|yes|no|on|off|null|~|-?[0-9][0-9.]{0,20}|\"[^\"\n]{0,200}\"|'[^'\n]{0,200}')?"
               r" ?(?:\n|$))")
REFUSE_RULES = {
    "tool-call-markup": re.compile(rf"< ?/? ?(?:[a-z][a-z0-9_-]{{0,19}} ?: ?)?{_TOOL_WORDS}(?=[ >/])"
                                   r"|< ?/? ?[a-z][a-z0-9_-]{0,19} ?: ?parameters?(?=[ >/])"),
    "chat-turn-marker": re.compile(
        rf"\n ?\n ?(?:human|assistant) ?:{_YAML_VALUE}|<\| ?(?:im_start|im_end|im_sep|endoftext|eot_id|start_header_id|"
        r"end_header_id|system|user|assistant) ?\|>|\[/?inst\]|<< ?/? ?sys ?>>"),
    "system-tag": re.compile(r"< ?/? ?(?:system[-_ ]?(?:reminder|prompt|message|instructions?)|"
                             r"developer[-_ ]?(?:message|prompt|instructions?))(?: [^>]{0,200})? ?>"),
    "data-uri-script": _Triggered(("data",), r"\bdata ?: ?(?:text/html|application/xhtml\+xml|(?:text|application)/"
                                  r"(?:x-)?(?:java|ecma|vb)script|application/x-(?:sh|msdownload|executable)|"
                                  r"application/wasm)\b"),
    "svg-script": _Triggered(("svg",), _Near(r"\bdata ?: ?image/svg\+xml",
                                             r"\bon[a-z]{3,30} ?=|< ?script\b|javascript ?:", 4000, False)),
}


_OVERRIDE_NOUNS = (r"(?:instructions?|prompts?|directions|directives|rules|guidelines|guidance|context|constraints|"
                   r"safeguards|policies)")
# "Ignore the previous instructions" as other languages say it (detection runs on a casefolded copy).
_OVERRIDES_ELSEWHERE = _folded(
    r"\b(?:ignorier(?:e|en|t)?|vergiss|vergesst|vergessen sie|missachte[nt]?|übergeh(?:e|en|t)?)\b[^.\n]{0,40}?"
    r"\b(?:vorherigen?|vorigen?|bisherigen?|obigen?|früheren?|alle[ns]?|deine[nm]?|ihre[nm]?|system)\b[^.\n]{0,20}?"
    r"\b(?:anweisung(?:en)?|instruktionen|befehle|regeln|vorgaben|richtlinien|anordnungen)\b"
    r"|\b(?:ignore[rz]?|oublie[rz]?|ne tenez pas compte|ne tiens pas compte)\b[^.\n]{0,40}?"
    r"\b(?:précédentes?|antérieures?|toutes?|tes|vos|système)\b[^.\n]{0,20}?"
    r"\b(?:instructions?|consignes?|règles|directives)\b"
    r"|\b(?:ignora|ignore|ignorad|olvida|olvide|omite)\b[^.\n]{0,40}?\b(?:anteriores|previas|todas|tus|sus|sistema)\b"
    r"[^.\n]{0,20}?\b(?:instrucciones|indicaciones|reglas|órdenes|directrices)\b"
    r"|\b(?:игнорируй(?:те)?|проигнорируй(?:те)?|забудь(?:те)?)\b[^.\n]{0,40}?"
    r"\b(?:предыдущие|прежние|все|свои|системные)\b"
    r"[^.\n]{0,20}?\b(?:инструкции|указания|правила|команды)\b"
    r"|(?:忽略|无视|無視|忽视|忽視|忘记|忘記|忘掉|不要理会|不要理會|跳过|跳過)[^。！\n]{0,20}?"
    r"(?:之前|以前|先前|此前|上面|以上|前面|所有|全部|一切|系统|系統)[^。！\n]{0,10}?"
    r"(?:指令|指示|说明|說明|提示|规则|規則|命令|要求|设定|設定)"
    r"|(?:以前|これまで|上記|前|全て|すべて)の(?:指示|命令|ルール|プロンプト|設定)を(?:すべて|全て)?(?:無視|忘れ)")
FLAG_RULES = {
    "instruction-override": _Triggered(
        ("ignor", "disregard", "forget", "override", "bypass", "new instruction", "you are now", "reveal",
         "vergiss", "vergess", "missachte", "übergeh", "oublie", "ne tenez pas compte", "ne tiens pas compte",
         "olvida", "olvide", "omite", "игнорируй", "забудь", "忽略", "无视", "無視", "忽视", "忽視", "忘记", "忘記",
         "忘掉", "不要理会", "不要理會", "跳过", "跳過", "忘れ"),
        r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(?:previous|prior|above|earlier|preceding|"
        rf"all|your|any|system|original|initial)\b[^.\n]{{0,20}}?\b{_OVERRIDE_NOUNS}\b"
        r"|\bnew instructions? (?:from|by) (?:the )?(?:human|operator|system|user|admin|developer)"
        r"|\byou are now (?:a|an|in|my|no longer|free|unrestricted|jailbroken|dan|the (?:system|admin|operator|root|"
        r"architect|developer|human))\b"
        r"|\breveal (?:your |the )?(?:system prompt|hidden instructions|instructions)"
        rf"|{_OVERRIDES_ELSEWHERE}"),
    "instruction-override-spelled-out": _Squeezed(
        r"(?:ignore|disregard|forget|override|bypass)(?:the|of|these|those|every){0,2}"
        r"(?:previous|prior|above|earlier|preceding|all|any|your|system|original){1,2}(?:the|of|my)?"
        r"(?:instructions?|prompts?|rules|guidelines|guidance|directions|directives)"),
    "role-play": _Triggered(
        ("act as", "act like", "behave as", "behave like", "respond as", "respond like", "answer as", "answer like",
         "pretend ", "roleplay ", "role-play ", "from now on", "you are no longer", "in character", "play a ",
         "developer mode", "do anything now", "du bist jetzt", "ab jetzt bist du", "tu es maintenant", "ahora eres",
         "теперь ты", "从现在", "從現在"), _AnyOf(
        _Near(r"\b(?:act|behave|respond|answer) (?:as|like)\b",
              r"[^.\n]{0,60}?\b(?:operator|system|admin|administrator|root|developer|human|architect|dan|an? ai|"
              r"an? assistant|a model|character|persona|unrestricted|unfiltered|jailbroken|evil|uncensored)\b",
              61, False),
        re.compile(r"\b(?:pretend (?:to be|you are|that you are|you're)\b|(?:roleplay|role-play) (?:as|with)\b"
                   r"|from now on,? (?:you are|you're|you will be|you will act|act as|respond as)\b"
                   r"|you are no longer (?:an? )?(?:ai|assistant|claude|model|bound|restricted|limited)\b"
                   r"|(?:stay|remain) in character\b|let'?s play a (?:game|role)\b|developer mode\b|do anything now\b"
                   r"|du bist jetzt\b|ab jetzt bist du\b|tu es maintenant\b|ahora eres\b"
                   + _folded(r"|теперь ты\b)"
                             r"|从现在(?:开始|起)[，, ]?你(?:是|将是|就是|扮演)|從現在(?:開始|起)[，, ]?你(?:是|將是|就是|扮演)")))),
    "role-marker": _Triggered(("human", "assistant"), rf"(?:^|\n|[.!?] )(?:human|assistant) ?:{_YAML_VALUE}"),
    "provenance-imitation": _Triggered(("[", "from"),
                                       r"(?:^|\n) ?\[ ?(?:operator|system|admin|human|broker|architect) ?\]"
                                       r"|(?:^|\n) ?from ?: ?(?:architect|operator|system|human|broker)\b"),
    "system-tag-bare": re.compile(r"< ?/? ?(?:system|developer)(?: [^>]{0,200})? ?>"),
    "remote-image": _Triggered(("![", "<", "srcset", "url"), _AnyOf(
        _Near(r"!\[", r"[^\]\n]{0,500}\] ?\( ?<? ?(?:[a-z][a-z0-9+.-]{0,20}:)?//", 600),
        _Near(r"< ?(?:img|image|source|video|audio|input|iframe|embed|object|track|body|table|td)\b",
              r"[^>]{0,500}\b(?:src|href|poster|data|background|lowsrc|dynsrc) ?= ?[\"']? ?(?:[a-z]{1,10}:)?//", 600),
        _Near(r"\bsrcset ?=", r"[^>]{0,500}?//", 600),
        re.compile(r"\burl ?\( ?[\"']? ?(?:https?:)?//"
                   # a reference-style image, ![s][s] or ![s], whose definition [s]: points off the machine
                   r"|\A(?=[\s\S]*?!\[)(?=[\s\S]*?(?:^|\n) {0,3}\[[^\]\n]{1,500}\] ?: ?<? ?"
                   r"(?:[a-z][a-z0-9+.-]{0,20}:)?//)"))),
    "hidden-comment": _CommentsSaying(
        r"\b(?:ignore|disregard|instructions?|prompts?|assistant|agents?|ai|llm|model|claude|codex|gemini|you|your|"
        r"system|operator|secrets?|tokens?|passwords?|do not (?:tell|mention|reveal))\b"),
    "tool-call-json": re.compile(
        r"\"(?:tool_calls|function_call|tool_use)\" ?:|\{ ?\"name\" ?: ?\"[^\"\n]{0,100}\" ?, ?"
        r"\"(?:arguments|parameters|input)\" ?:|\"type\" ?: ?\"(?:function|tool_use|tool_call)\""),
}
SECRET_RULES = {
    "private-key": re.compile(r"-----BEGIN (?:[A-Z0-9]{1,12} ){0,3}PRIVATE KEY-----"),
    "session-token": re.compile(r"\bctl1\.[A-Za-z0-9_-]{16,}={0,2}\.[A-Za-z0-9_-]{16,}"),
    "api-key": re.compile(r"\b(?:sk-ant-[A-Za-z0-9_-]{20,}|sk-(?:proj-)?[A-Za-z0-9_-]{32,}|AKIA[0-9A-Z]{16}|"
                          r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}|xox[abposr]-[A-Za-z0-9-]{10,}|"
                          r"AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,})"),
}
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{120,}")
_SVG_BASE64 = re.compile(r"(data ?: ?image/svg\+xml ?; ?base64 ?, ?)([A-Za-z0-9+/]{4,40000}=?=?)", re.I)
_SPACES = re.compile(r"[ \t\r\f\v]+")


def _refuse(field: str, rule: str, what: str) -> ApiError:
    return ApiError(422, "content_filtered", f"{field} was refused: {what} (rule {rule})", rule=rule, field=field)


def _has_base64_run(text: str) -> bool:
    """Long runs that mix upper case, lower case and digits, as encoded binary does (a row of x's, a hex
    hash or a path does not)."""
    for run in _BASE64_RUN.findall(text):
        if not run.isalpha() and not run.isdigit() and run != run.lower() and run != run.upper():
            return True
    return False


def _decoded_svg(match) -> str:
    """A base64 SVG data URI as a browser renders it, so its script handlers are seen."""
    payload = match.group(2)
    try:
        svg = base64.b64decode(payload + "=" * (-len(payload) % 4)).decode("utf-8", "replace")
    except ValueError:
        return match.group()
    return match.group(1) + svg.replace("\n", " ")


def detection_copy(text: str) -> str:
    """The text as a reader (or a model) would take it: escapes decoded, compatibility forms, case and
    look-alikes folded, invisible characters removed, runs of blanks collapsed. Never stored."""
    folded = text
    for _ in range(3):
        if "&" not in folded and "%" not in folded:
            break
        decoded = urllib.parse.unquote(html.unescape(folded), errors="replace")
        if decoded == folded:
            break
        folded = decoded
    folded = _SVG_BASE64.sub(_decoded_svg, folded).replace("\r\n", "\n")
    folded = unicodedata.normalize("NFKC", folded).casefold().translate(_LOOKALIKES)
    return _SPACES.sub(" ", _INVISIBLE.sub("", folded))


def screen(field: str, text: str, secrets=()) -> str:
    """Return None to pass, a rule name to flag; raise 422 to refuse. Never echoes the text."""
    if _SURROGATES.search(text):
        raise _refuse(field, "invalid-unicode", "it holds a lone surrogate, which is not valid text")
    if _ANSI.search(text):
        raise _refuse(field, "control-character", "it holds ANSI colour or cursor codes (ESC [ ...); strip them "
                                                   "first: run the command with NO_COLOR=1 or TERM=dumb, or pipe it "
                                                   "through sed 's/\\x1b\\[[0-9;]*[A-Za-z]//g'")
    control = _CONTROLS.search(text)
    if control:
        raise _refuse(field, "control-character", f"it holds the control character U+{ord(control.group()):04X}; "
                                                   "only tab, newline and CRLF line ends are allowed")
    if _BIDI_OVERRIDES.search(text):
        raise _refuse(field, "hidden-text", "it holds a bidirectional override, which can hide what a reader sees")
    if _TAG_CHARS.search(text) and _TAG_CHARS.search(_FLAG_TAGS.sub("", text)):
        raise _refuse(field, "hidden-text", "it holds Unicode tag characters, which are invisible")
    for rule, pattern in SECRET_RULES.items():
        if pattern.search(text):
            raise _refuse(field, "secret", f"it looks like a credential ({rule}); never paste secrets to peers")
    if any(secret and secret in text for secret in secrets):
        raise _refuse(field, "secret", "it contains one of this broker's own secrets; never paste secrets to peers")
    seen = detection_copy(text)
    split = _SPLIT_WORD.search(text) is not None
    for rule, pattern in REFUSE_RULES.items():
        if pattern.search(seen):
            raise _refuse(field, rule, "it has the shape of a prompt injection; describe it in plain prose instead")
    for rule, pattern in FLAG_RULES.items():
        if pattern.search(seen):
            if split:
                raise _refuse(field, "hidden-text", "invisible characters split a word that the filter flags")
            return rule
    if _has_base64_run(text):
        return "base64-run"
    return None
