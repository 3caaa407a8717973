"""Control Tower Lite: several coding agents on one machine working as one team, with a human watching.

The package holds everything; the checkout's flat files (`broker.py`, `mcp_server.py`, `install.py`,
`launch.py`, `hook.py`) are thin entry points into it, so `python3 launch.py` works from a clone and
`pip install .` adds one package, `ctl`, and no top-level modules.
"""
import os
import sys

VERSION = "0.2.0"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(PACKAGE_DIR)

# entry point -> (flat file in a checkout, module in the package, console script of an install)
ENTRY_POINTS = {
    "broker": ("broker.py", "ctl.broker", "ctl-broker"),
    "mcp": ("mcp_server.py", "ctl.mcp", "ctl-mcp"),
    "install": ("install.py", "ctl.install", "ctl-install"),
    "launch": ("launch.py", "ctl.launch", "ctl-launch"),
    "hook": ("hook.py", "ctl.hooks", "ctl-hook"),
}


def entry_command(name: str) -> list:
    """How to run one of our programs with this interpreter: the checkout's file, else the module. A checkout's
    file runs with -S: the product needs nothing from site-packages, and skipping `site` (every .pth file of
    the machine) is most of what a hook costs beyond starting Python at all."""
    flat, module, _ = ENTRY_POINTS[name]
    path = os.path.join(CHECKOUT, flat)
    return [sys.executable, "-S", path] if os.path.isfile(path) else [sys.executable, "-m", module]


def user_command(name: str) -> str:
    """What to tell a person to type: `ctl-launch` after an install, else `python3 launch.py`."""
    flat, _, script = ENTRY_POINTS[name]
    if os.path.isfile(os.path.join(CHECKOUT, flat)):
        here = os.path.realpath(os.getcwd()) == os.path.realpath(CHECKOUT)
        return f"{python_name()} {flat if here else os.path.join(CHECKOUT, flat)}"
    import shutil                       # here: every hook imports this package, few of them print a command
    if shutil.which(script):
        return script
    for folder in (os.path.dirname(os.path.abspath(sys.argv[0] or ".")), os.path.dirname(sys.executable)):
        beside = os.path.join(folder, script)        # an install whose bin folder is not on PATH
        if os.access(beside, os.X_OK):
            return beside
    return f"{python_name()} -m {ENTRY_POINTS[name][1]}"


def python_name() -> str:
    """The interpreter's short name when PATH finds this very one under it, else `python3`."""
    import shutil
    short = os.path.basename(sys.executable)
    found = shutil.which(short)
    return short if found and os.path.realpath(found) == os.path.realpath(sys.executable) else "python3"


def quiet_pipe(main):
    """A command piped into `head` ends quietly once its reader has all it wanted: no Broken pipe traceback."""
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # so the exit's flush is quiet too
            return 0
    run.__doc__, run.__name__ = main.__doc__, main.__name__
    return run
