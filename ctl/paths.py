"""One file, one lock: paths compared the way the file system compares names.

A lock's key is its real path, Unicode-normalized (NFC: macOS treats `café` and `cafe\u0301` as one
name) and case-folded where the project's file system folds case (found by asking it, once per
folder). Hard links are one file under two names: for existing files the file's identity
(st_dev, st_ino) is compared too, which only matters when the file has more than one link.
The lock keeps the spelling its holder used; only comparisons go through the key.
"""
import os
import unicodedata

_FOLDS = {}                 # folder -> whether its file system folds case
_FOLDS_KEPT = 256


def folds_case(folder: str) -> bool:
    """Whether `folder`'s file system treats names that differ only in case as one: stat a case-swapped
    spelling of an entry (or of the folder itself) and see if it is the same file."""
    if folder in _FOLDS:
        return _FOLDS[folder]
    answer = False
    try:
        with os.scandir(folder) as entries:
            candidates = [(folder, e.name) for _, e in zip(range(64), entries)]
    except OSError:
        candidates = []
    candidates.append(os.path.split(folder.rstrip(os.sep)) if folder.rstrip(os.sep) else (folder, ""))
    for parent, name in candidates:
        swapped = name.swapcase()
        if swapped == name:
            continue
        try:
            answer = os.path.samestat(os.stat(os.path.join(parent, name)), os.stat(os.path.join(parent, swapped)))
        except OSError:
            answer = False
        break
    if len(_FOLDS) >= _FOLDS_KEPT:
        _FOLDS.clear()
    _FOLDS[folder] = answer
    return answer


def name_key(real_path: str, root: str) -> str:
    """The lock key of an absolute real path inside `root`."""
    key = unicodedata.normalize("NFC", real_path)
    return key.casefold() if folds_case(root) else key


def file_id(path: str):
    """(st_dev, st_ino, st_nlink) of an existing file, else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_nlink


def resolve(path: str, cwd: str) -> str:
    """What an agent means by `path`: relative to the folder it works in."""
    return os.path.realpath(path if os.path.isabs(path) else os.path.join(cwd, path))
