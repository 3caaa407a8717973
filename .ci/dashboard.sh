#!/usr/bin/env bash
# The dashboard in Debian's headless Chromium, driven by Playwright's Python package in a throwaway
# virtual environment (Playwright only drives /usr/bin/chromium; no browser is downloaded). It opens the
# dashboard through launch.py's real handoff file, from disk (file://), and at 1440 and 420 px wide, then
# searches the browser profile for the tokens. Screenshots land in artifacts/dashboard*.png.
set -euo pipefail
work=$1
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv "$work/browser"
"$work/browser/bin/pip" install --quiet --disable-pip-version-check playwright
"$work/browser/bin/python" tests/conformance/dashboard_browser.py
