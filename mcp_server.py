#!/usr/bin/env python3
"""Control Tower Lite MCP server over stdio, one per session (see ctl/mcp.py)."""
import sys

from ctl.mcp import main

if __name__ == "__main__":
    sys.exit(main())
