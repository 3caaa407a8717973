"""The content filter: screens free text that peers write before the broker stores it."""
import html
import re
import unicodedata
import urllib.parse

from ctl.errors import ApiError


# A tripwire, not a wall: it catches the common injection shapes after undoing the usual disguises
# (compatibility forms, entities, percent-escapes, look-alike letters). Provenance is the real defence.

_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ɡ": "g", "ı": "i", "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i",
    "κ": "k", "τ": "t", "υ": "u", "χ": "x", "ε": "e", "ѵ": "v", "ո": "n", "ս": "u",
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "ᐸ": "<", "ᐳ": ">",
    "˂": "<", "˃": ">", "❮": "<", "❯": ">", "＜": "<", "＞": ">", "‐": "-", "‑": "-", "–": "-",
})
_VARIATION_SELECTORS = re.compile("[\u034f\ufe00-\ufe0f\U000e0100-\U000e01ef\u115f\u1160\u3164\uffa0\u2800]")
FILTER_RULES = {
    "tool-call-markup": re.compile(
        r"<\s*/?\s*(?:[a-z]+\s*:\s*)?(?:function_calls|function_results|invoke|parameter|tool_use|"
        r"tool_result|tool_call|function_call|tool_calls)\b"),
    "function-call-json": re.compile(
        r"\"(?:tool_calls|function_call|tool_use)\"\s*:|\{\s*\"name\"\s*:\s*\"[^\"]*\"\s*,\s*\"(?:arguments|parameters|input)\"\s*:"
        r"|\"type\"\s*:\s*\"(?:function|tool_use|tool_call)\""),
    "chat-role-marker": re.compile(
        r"(?:^|\n)\s*(?:human|assistant|system)\s*:|<\|\s*(?:im_start|im_end|im_sep|endoftext|system|user|"
        r"assistant|eot_id|start_header_id|end_header_id)\s*\|>|\[/?inst\]|<<\s*/?\s*sys\s*>>"),
    "system-tag": re.compile(r"<\s*/?\s*(?:system[\w-]*|instructions?|developer[\w-]*|im_start)\b[^>]*>"),
    "data-uri": re.compile(r"\bdata\s*:\s*[a-z0-9.+-]+/[a-z0-9.+-]+\s*[;,]"),
    "remote-image": re.compile(r"!\[[^\]]*\]\(\s*<?\s*(?:[a-z][a-z0-9+.-]*:)?//|<\s*img\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:[a-z]+:)?//"),
}


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{120,}")


def _has_base64_run(normal: str) -> bool:
    """Long runs that mix upper case, lower case and digits, as encoded binary does (a row of x's does not)."""
    return any(re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"\d", run)
               for run in _BASE64_RUN.findall(normal))


def _disguises_undone(text: str) -> str:
    """The text as a reader would see it: entities and escapes decoded, look-alikes folded."""
    folded = text
    for _ in range(3):
        decoded = urllib.parse.unquote(html.unescape(folded))
        if decoded == folded:
            break
        folded = decoded
    return unicodedata.normalize("NFKC", folded).casefold().translate(_LOOKALIKES)


def screen_text(field: str, text: str) -> str:
    """Return the NFKC form of `text`, or raise 422 naming the rule it broke (never echoing it)."""
    normal = unicodedata.normalize("NFKC", text)
    for char in normal:
        category = unicodedata.category(char)
        if (category in ("Cf", "Co", "Cs", "Cn", "Zl", "Zp") or (category == "Cc" and char not in "\t\n\r")):
            raise ApiError(422, "content_filtered",
                           f"{field} contains an invisible or control character (U+{ord(char):04X}); remove it",
                           rule="invisible-character", field=field)
    if _VARIATION_SELECTORS.search(normal):
        raise ApiError(422, "content_filtered", f"{field} contains an invisible filler character; remove it",
                       rule="invisible-character", field=field)
    seen = _disguises_undone(normal)
    broken = next((rule for rule, pattern in FILTER_RULES.items() if pattern.search(seen)), None)
    if broken is None and _has_base64_run(normal):
        broken = "base64-run"
    if broken is not None:
        raise ApiError(422, "content_filtered",
                       f"{field} was refused by the content filter (rule {broken}); rephrase it as plain prose",
                       rule=broken, field=field)
    return normal
