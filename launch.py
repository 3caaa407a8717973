#!/usr/bin/env python3
"""Start the Control Tower Lite broker and open its dashboard (see ctl/launch.py)."""
import sys

from ctl.launch import main

if __name__ == "__main__":
    sys.exit(main())
