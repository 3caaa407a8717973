#!/usr/bin/env bash
# pip, pipx and uv each install the project; every install gives working commands that serve the
# dashboard (installed as a data file), and puts one package (ctl) into site-packages, never top-level modules
# like broker.py.
set -euo pipefail
work=$1
checkout=$(pwd)
python3 -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet --disable-pip-version-check pipx uv

check_install() {    # label, bin dir, site-packages dir
  local label=$1 bin=$2 site=$3
  for module in broker mcp_server install launch hook ctl_common; do
    [ ! -e "$site/$module.py" ] || { echo "FAILED: $label put $module.py at the top of site-packages"; exit 1; }
  done
  [ ! -e "$site/dashboard.html" ] || { echo "FAILED: $label put dashboard.html at the top of site-packages"; exit 1; }
  (
    export CTL_STATE_DIR="$work/state-$label" HOME="$work/home-$label" PATH="$bin:$PATH"
    CTL_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export CTL_PORT
    mkdir -p "$HOME"
    cd "$work"
    "$bin/ctl-launch" --no-browser | tee "$work/launch-$label.txt"
    grep -q "ctl-install" "$work/launch-$label.txt" || { echo "FAILED: $label launch does not name ctl-install"; exit 1; }
    "$bin/ctl-launch" --status
    python3 -c "import os, urllib.request; page = urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"CTL_PORT\"]}/').read(); assert b'Control Tower Lite' in page, 'the install does not serve its dashboard'"
    "$bin/ctl-install" --print | grep -q '"ctl.mcp"'
    "$bin/ctl-hook" PreToolUse </dev/null
    "$bin/ctl-launch" --stop
  )
  echo "$label: commands work, one package installed"
}

python3 -m venv "$work/pip"
"$work/pip/bin/pip" install --quiet --disable-pip-version-check "$checkout"
check_install pip "$work/pip/bin" "$("$work/pip/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

export PIPX_HOME="$work/pipx" PIPX_BIN_DIR="$work/pipx-bin"
"$work/tools/bin/pipx" install --quiet "$checkout"
pipx_python="$PIPX_HOME/venvs/control-tower-lite/bin/python"
check_install pipx "$PIPX_BIN_DIR" "$("$pipx_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

export UV_TOOL_DIR="$work/uv-tools" UV_TOOL_BIN_DIR="$work/uv-bin" UV_CACHE_DIR="$work/uv-cache"
"$work/tools/bin/uv" tool install --quiet --python "$(command -v python3)" "$checkout"
uv_python="$UV_TOOL_DIR/control-tower-lite/bin/python"
check_install uv "$UV_TOOL_BIN_DIR" "$("$uv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "Packaging stage: 3 passed, 0 failed"
