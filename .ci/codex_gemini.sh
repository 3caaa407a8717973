#!/usr/bin/env bash
# Codex CLI or Gemini CLI as a real client: the newest release from npm, driven offline by our scripted stand-in
# for its model API (tests/conformance/<client>_real.py), in a fresh HOME with its own CTL_PORT and state.
#   bash .ci/codex_gemini.sh codex|gemini WORK_DIR
set -euo pipefail
client=$1 work=$2
declare -A packages=([codex]=@openai/codex@latest [gemini]=@google/gemini-cli@latest)
package=${packages[$client]:?usage: codex_gemini.sh codex|gemini WORK_DIR}
if ! timeout 60 npm ping >/dev/null 2>&1; then
  echo "SKIPPED: the npm registry cannot be reached, so $package cannot be installed"
  [ -z "${CTL_CI_SKIPPED:-}" ] || echo "the npm registry cannot be reached, so $package cannot be installed" >>"$CTL_CI_SKIPPED"
  exit 0
fi
prefix="$work/$client"
for attempt in 1 2; do                    # one retry: a registry hiccup is not a failure of ours
  if timeout 600 npm install --silent --no-audit --no-fund --prefix "$prefix" "$package"; then break; fi
  [ "$attempt" = 2 ] && { echo "FAILED: npm could not install $package"; exit 1; }
done
echo "installed $package: $(npm ls --prefix "$prefix" --depth=0 2>/dev/null | grep -o "${package%@latest}@[^ ]*")"
timeout 420 python3 tests/conformance/"${client}_real.py" "$prefix/node_modules/.bin"
