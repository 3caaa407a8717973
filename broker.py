#!/usr/bin/env python3
"""Control Tower Lite broker: the one stateful process (see ctl/broker.py)."""
import sys

from ctl.broker import main

if __name__ == "__main__":
    sys.exit(main())
