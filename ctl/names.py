"""Peer names: the allowed shape, reserved words, and look-alike skeletons."""
import re


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
RESERVED_NAMES = {"*", "operator", "system", "broker", "all", "everyone", "architect", "human", "admin",
                  "root", "user", "assistant", "dashboard", "observer", "null", "none", "nobody", "server",
                  "claude", "anthropic", "openai", "moderator", "sysadmin", "supervisor", "controltower"}
# Words that only dress a reserved name up as someone: "the-operator", "real_admin", "system-official".
AUTHORITY_FILLERS = ("the", "real", "true", "official", "actual", "your", "my", "our", "head", "chief")
_SKELETON = str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s", "|": "l"})
# More digits read as letters, for reserved words only: among peers, p6 and p9 are two names, not one.
_LEET = str.maketrans({"3": "e", "4": "a", "7": "t", "8": "b", "9": "g", "6": "g"})


def name_skeleton(name: str) -> str:
    """Names that look alike share a skeleton: case, separators and 0/o, 1/l/i, rn/m folded."""
    plain = re.sub(r"[._-]", "", name.lower()).replace("rn", "m").replace("vv", "w")
    return plain.translate(_SKELETON)


RESERVED_SKELETONS = {name_skeleton(n).translate(_LEET) for n in RESERVED_NAMES if n != "*"}
_FILLERS = "|".join(name_skeleton(f) for f in AUTHORITY_FILLERS)
_DRESSED = re.compile(rf"(?:{_FILLERS})*(.+?)(?:{_FILLERS})*")


def reads_as_authority(name: str) -> bool:
    """A reserved name, spelled with look-alike letters or dressed up with filler words."""
    skeleton = name_skeleton(name).translate(_LEET)
    return skeleton in RESERVED_SKELETONS or _DRESSED.fullmatch(skeleton).group(1) in RESERVED_SKELETONS
