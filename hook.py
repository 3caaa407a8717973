#!/usr/bin/env python3
"""Control Tower Lite's Claude Code hooks: locks that hold, messages that arrive (see ctl/hooks.py)."""
import sys

from ctl.hooks import main

if __name__ == "__main__":
    sys.exit(main())
