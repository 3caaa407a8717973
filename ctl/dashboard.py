"""The dashboard's page, and the one-time links that open it without a token in any URL.

A browser keeps every URL it visits (History, Sessions, and sync uploads them), so no token goes in one. The
operator (or observer) asks the broker for a one-time code; the dashboard trades the code for its token once,
over a same-origin POST, and keeps the token in memory only. A code is worthless once used or CODE_TTL seconds
old. The handoff file a browser is pointed at (0600, in the state directory, so the code is in no command line)
is written and deleted here: it goes when its code is used or expires.
"""
import hashlib
import html
import os
import secrets
from importlib import metadata

from ctl import CHECKOUT, common
from ctl.errors import ApiError

CODE_TTL = 120           # seconds a one-time link works
MAX_PENDING = 32         # unused codes held at once; minting more waits for some to be used or expire
HANDOFF_FILE = "open-dashboard.html"
DISTRIBUTION = "control-tower-lite"


def page_path():
    """dashboard.html at the top of a checkout; in an install, the copy the installer put among its data files."""
    beside = os.path.join(CHECKOUT, "dashboard.html")
    if os.path.isfile(beside):
        return beside
    try:
        installed = metadata.files(DISTRIBUTION) or ()
    except metadata.PackageNotFoundError:
        return None
    found = [os.path.normpath(f.locate()) for f in installed if f.name == "dashboard.html"]
    return next((path for path in found if os.path.isfile(path)), None)


def _digest(code: str) -> str:
    """Codes are held by digest: a dict lookup's timing then says nothing about a code's characters."""
    return hashlib.sha256(code.encode("utf-8", "replace")).hexdigest()


class Handoffs:
    """Unused one-time codes, in memory: a broker restart voids them, and launch.py mints fresh ones."""

    def __init__(self, state_dir: str, port: int):
        self.state_dir, self.port = state_dir, port
        self.pending = {}          # digest -> (kind, expires)
        self.in_file = None        # digest of the code the handoff file holds

    def mint(self, kind: str, now: float, write_file: bool) -> dict:
        self._expire(now)
        if len(self.pending) >= MAX_PENDING:
            raise ApiError(429, "too_many_links", f"{MAX_PENDING} one-time links are unused; "
                                                   f"retry when one is used or expires ({CODE_TTL} s)")
        code = secrets.token_urlsafe(24)
        self.pending[_digest(code)] = (kind, now + CODE_TTL)
        url = f"http://{common.HOST}:{self.port}/#code={code}"
        answer = {"url": url, "expires_in": CODE_TTL, "viewer": kind}
        if write_file:
            answer["file"] = self._write_file(url)
            self.in_file = _digest(code)
        return answer

    def redeem(self, code: str, now: float) -> str:
        """The kind of token the code stands for, once; then the code is gone, and its file with it."""
        self._expire(now)
        digest = _digest(code)
        entry = self.pending.pop(digest, None)
        if digest == self.in_file:
            self._remove_file()
        if entry is None:
            raise ApiError(401, "link_used", "this dashboard link was already used or has expired; "
                                             "run launch.py again for a fresh one")
        return entry[0]

    def _expire(self, now: float) -> None:
        for digest in [d for d, (_, expires) in self.pending.items() if expires <= now]:
            del self.pending[digest]
            if digest == self.in_file:
                self._remove_file()

    def _write_file(self, url: str) -> str:
        """A 0600 page that sends the browser on to the link, as Jupyter does: a browser's command line is
        readable by every local user in /proc, this file by its owner only."""
        path = os.path.join(self.state_dir, HANDOFF_FILE)
        link = html.escape(url)
        page = (f'<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
                f'<meta http-equiv="refresh" content="0;url={link}"><title>Control Tower Lite</title>'
                f'<a href="{link}">Open the dashboard</a> (a one-time link; this file is deleted once it is used)\n')
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(page)
        os.replace(path + ".tmp", path)
        return path

    def _remove_file(self) -> None:
        self.in_file = None
        try:
            os.unlink(os.path.join(self.state_dir, HANDOFF_FILE))
        except OSError:          # already gone; or it stays, holding a code that no longer works
            pass
