#!/usr/bin/env bash
# Claude Code's CLI as a real client, in a throwaway HOME: install.py's registration, then the plugin; then real
# sessions driven by the scripted Messages API stand-in (tests/conformance/claude_real.py), current and oldest CLI.
set -euo pipefail
work=$1 checkout=$2
export HOME="$work/home" PATH="$work/claude/node_modules/.bin:$PATH"
mkdir -p "$HOME"
export CTL_STATE_DIR="$HOME/state" CTL_PORT
CTL_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cd "$work"
echo "Claude Code under test: $(claude --version) (npm latest); oldest supported: $("$work/claude-oldest/node_modules/.bin/claude" --version)"
fail() { echo "FAILED: $*"; exit 1; }

python3 "$checkout/install.py" --hooks
listing=$(timeout 120 claude mcp list 2>&1); echo "$listing"
grep -Eq '^ctl: .*Connected' <<<"$listing" || fail "claude mcp list does not show ctl connected"
! python3 "$checkout/launch.py" --status >/dev/null 2>&1 || fail "claude mcp list left a broker running (a health check must leave no trace)"
python3 "$checkout/install.py" --uninstall
if [ -f "$HOME/.claude.json" ] && grep -q '"ctl"' "$HOME/.claude.json"; then fail "uninstall left our entry"; fi

claude plugin marketplace add "$checkout"
claude plugin install ctl@control-tower-lite
plugins=$(claude plugin list 2>&1); echo "$plugins"
grep -A6 'ctl@control-tower-lite' <<<"$plugins" | grep -q 'enabled' || fail "the plugin is not enabled"
details=$(claude plugin details ctl@control-tower-lite 2>&1); echo "$details"
grep -Eq 'MCP servers \(1\) +ctl' <<<"$details" || fail "plugin details does not list the MCP server"
hooks=$(python3 -c 'import json, sys; e = list(json.load(open(sys.argv[1]))["hooks"]); print("Hooks \\(%d\\) +%s" % (len(e), ", ".join(e)))' \
  "$checkout/hooks/hooks.json")
grep -Eq "$hooks" <<<"$details" || fail "plugin details does not list every hook of hooks/hooks.json ($hooks)"
python3 "$checkout/install.py" --status | tee "$work/status.txt"
grep -q "ctl@control-tower-lite is installed" "$work/status.txt" || fail "install.py --status does not see the plugin"
python3 "$checkout/install.py" | grep -q "already provided by the Claude Code plugin" || fail "install.py would double up"
listing=$(timeout 120 claude mcp list 2>&1); echo "$listing"
grep -Eq '^plugin:ctl:ctl: .*Connected' <<<"$listing" || fail "claude mcp list does not show the plugin's server connected"
claude plugin uninstall ctl@control-tower-lite
claude plugin marketplace remove control-tower-lite
! claude plugin list 2>&1 | grep -q 'ctl@control-tower-lite' || fail "the plugin is still listed"
! timeout 120 claude mcp list 2>&1 | grep -q 'plugin:ctl' || fail "the plugin's server is still registered"
python3 "$checkout/launch.py" --stop >/dev/null
echo "Claude Code CLI registration: 1 passed, 0 failed"

# Real sessions, offline: each team gets its own HOME, broker port and state directory from the driver. Every scenario
# of claude_real.py runs (team: the tools, edit locks, Stop; shell: Bash writes to a held file denied or reported).
status=0
timeout 600 python3 "$checkout/tests/conformance/claude_real.py" --claude "$(command -v claude)" || status=1
timeout 300 python3 "$checkout/tests/conformance/claude_real.py" --claude "$work/claude-oldest/node_modules/.bin/claude" \
  --mode install || status=1
command -v tmux >/dev/null || { apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }   # the idle wake runs interactively
timeout 300 python3 "$checkout/tests/conformance/claude_idle_wake.py" --claude "$(command -v claude)" || status=1
[ "$status" = 0 ] || fail "Claude Code sessions: see the FAIL lines above (what the model was shown)"
