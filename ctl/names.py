"""Peer names: the allowed shape, reserved words, and look-alike skeletons."""
import re


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
RESERVED_NAMES = {"*", "operator", "system", "broker", "all", "everyone", "architect", "human", "admin",
                  "root", "user", "assistant", "dashboard", "observer", "null", "none", "nobody", "server"}
_SKELETON = str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s", "|": "l"})


def name_skeleton(name: str) -> str:
    """Names that look alike share a skeleton: case, separators and 0/o, 1/l/i, rn/m folded."""
    plain = re.sub(r"[._-]", "", name.lower()).replace("rn", "m").replace("vv", "w")
    return plain.translate(_SKELETON)


RESERVED_SKELETONS = {name_skeleton(n) for n in RESERVED_NAMES if n != "*"}
