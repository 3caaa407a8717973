#!/usr/bin/env python3
"""How fast an idle Claude Code session wakes for a message, and what its waiting hook costs while idle.

    python3 bench/wake.py [--claude PATH] [--rounds 20] [--idle-seconds 60]

Runs the real CLI interactively (tests/conformance/claude_idle_wake.py: tmux, offline stand-in): each round a
peer sends the idle session a message over the HTTP API, and the latency is the time from the send to the model's
new request arriving at the stand-in (the CLI's own reaction included). Then an armed waiter is left idle and its
CPU read from the scheduler's count. Writes bench/WAKE.md with the machine and the date.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "conformance"))

import claude_idle_wake  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claude", default="/opt/cc/node_modules/.bin/claude")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args()
    out = os.path.join(tempfile.mkdtemp(prefix="ctl-wake-bench-"), "result.json")
    code = claude_idle_wake.main(["--claude", args.claude, "--rounds", str(args.rounds),
                                  "--idle-seconds", str(args.idle_seconds), "--json", out])
    with open(out) as handle:
        result = json.load(handle)
    latencies = [s * 1000 for s in result.get("latencies", [])]
    if not latencies:
        print("no wake was measured")
        return 1
    lines = [f"# Idle wake (bench/wake.py), {time.strftime('%Y-%m-%d')}", "",
             f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"Claude Code {result['version']}, interactive under tmux, offline stand-in.", "",
             "| measure | value |", "|---|---|",
             f"| wakes timed | {len(latencies)} |",
             f"| send -> the model's new request, median | {statistics.median(latencies):.0f} ms |",
             f"| send -> the model's new request, p99 | {claude_idle_wake.percentile(latencies, 0.99):.0f} ms |",
             f"| fastest / slowest | {min(latencies):.0f} / {max(latencies):.0f} ms |"]
    if result.get("idle_cpu_per_minute") is not None:
        lines.append(f"| CPU of an idle waiting hook (over {args.idle_seconds:.0f} s) | "
                     f"{result['idle_cpu_per_minute'] * 1000:.2f} ms per minute |")
    with open(os.path.join(HERE, "WAKE.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
