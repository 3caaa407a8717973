"""The content filter: screens free text that peers write, with three outcomes.

- refuse (422 naming the rule): unambiguous structure that only an injection or a leak needs: tool-call and
  function-result markup, chat-turn markers, system-reminder-style tags, data: URIs of HTML or script,
  hidden text (tag characters, bidi overrides, invisible characters splitting a keyword), secrets;
- flag (delivered, marked with the rule, shown to the human): what honest text also contains now and then:
  plain-language instruction overrides, role words that may be turn markers, provenance imitation, remote
  images, long base64 runs, JSON shaped like a tool call;
- pass: everything else, byte for byte.

Detection runs on a normalized copy (entities and percent-escapes decoded, NFKC, case and look-alikes folded,
invisible characters removed, white space collapsed); what is stored and delivered is the original.
Every pattern is linear: quantifiers that could meet each other are bounded, and white space is collapsed
before matching, so no input makes a pattern backtrack over it twice.
"""
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
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")

_TOOL_WORDS = (r"(?:function_calls|function_results|invoke|parameters?|tool_use|tool_result|tool_calls?|"
               r"function_call|tool_code|tool_response)")
REFUSE_RULES = {
    "tool-call-markup": re.compile(rf"< ?/? ?(?:[a-z][a-z0-9_-]{{0,19}} ?: ?)?{_TOOL_WORDS}(?=[ >/])"),
    "chat-turn-marker": re.compile(
        r"\n ?\n ?(?:human|assistant) ?:|<\| ?(?:im_start|im_end|im_sep|endoftext|eot_id|start_header_id|"
        r"end_header_id|system|user|assistant) ?\|>|\[/?inst\]|<< ?/? ?sys ?>>"),
    "system-tag": re.compile(r"< ?/? ?(?:system[-_ ]?(?:reminder|prompt|message|instructions?)|"
                             r"developer[-_ ]?(?:message|prompt|instructions?))(?: [^>]{0,200})? ?>"),
    "data-uri-script": re.compile(r"\bdata ?: ?(?:text/html|application/xhtml\+xml|(?:text|application)/"
                                  r"(?:x-)?(?:java|ecma|vb)script|application/x-(?:sh|msdownload|executable)|"
                                  r"application/wasm)\b"),
}
FLAG_RULES = {
    "instruction-override": re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(?:previous|prior|above|earlier|preceding|"
        r"all|your|any|system)\b[^.\n]{0,20}?\b(?:instructions?|prompts?|directions|rules|guidelines|context)\b"
        r"|\bnew instructions? (?:from|by) (?:the )?(?:human|operator|system|user|admin|developer)"
        r"|\byou are now (?:a|an|in|my|no longer|free|unrestricted|jailbroken|dan|the (?:system|admin|operator|root|"
        r"architect|developer|human))\b"
        r"|\breveal (?:your |the )?(?:system prompt|hidden instructions|instructions)"),
    "role-marker": re.compile(r"(?:^|\n|[.!?] )(?:human|assistant) ?:"),
    "provenance-imitation": re.compile(r"(?:^|\n) ?\[ ?(?:operator|system|admin|human|broker|architect) ?\]"
                                       r"|(?:^|\n) ?from ?: ?(?:architect|operator|system|human|broker)\b"),
    "system-tag-bare": re.compile(r"< ?/? ?(?:system|developer)(?: [^>]{0,200})? ?>"),
    "remote-image": re.compile(r"!\[[^\]\n]{0,500}\] ?\( ?<? ?(?:[a-z][a-z0-9+.-]{0,20}:)?//"
                               r"|< ?img\b[^>]{0,500}\bsrc ?= ?[\"']? ?(?:[a-z]{1,10}:)?//"),
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
    folded = unicodedata.normalize("NFKC", folded).casefold().translate(_LOOKALIKES)
    return _SPACES.sub(" ", _INVISIBLE.sub("", folded))


def screen(field: str, text: str, secrets=()) -> str:
    """Return None to pass, a rule name to flag; raise 422 to refuse. Never echoes the text."""
    if _SURROGATES.search(text):
        raise _refuse(field, "invalid-unicode", "it holds a lone surrogate, which is not valid text")
    control = _CONTROLS.search(text)
    if control:
        raise _refuse(field, "control-character", f"it holds the control character U+{ord(control.group()):04X}; "
                                                   "only tab and newline are allowed")
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
