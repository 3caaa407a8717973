#!/usr/bin/env python3
"""Register Control Tower Lite with Claude Code and other agents (see ctl/install.py)."""
import sys

from ctl.install import main

if __name__ == "__main__":
    sys.exit(main())
