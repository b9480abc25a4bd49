#!/usr/bin/env bash
# Installs what the browser test of the admin UI (tests/ui_e2e.rs) needs, on Debian:
# Chromium (/usr/bin/chromium, or the one CHROMIUM_BIN names) and playwright-core in
# tests/ui/node_modules. Idempotent: does nothing when both are already in place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

fail() {
    echo "tests/ui/setup.sh: $*" >&2
    exit 1
}

# --- Chromium -------------------------------------------------------------------------------
chromium="${CHROMIUM_BIN:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    if [ -n "${CHROMIUM_BIN:-}" ]; then
        fail "CHROMIUM_BIN=$CHROMIUM_BIN is not an executable file"
    fi
    command -v apt-get >/dev/null 2>&1 ||
        fail "/usr/bin/chromium is missing and there is no apt-get: install Chromium, or set CHROMIUM_BIN to a Chromium binary"
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        fail "/usr/bin/chromium is missing; run 'apt-get update && apt-get install -y chromium' as root (no sudo here), or set CHROMIUM_BIN"
    fi
    echo "tests/ui/setup.sh: installing chromium with apt-get" >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
        fail "apt-get update failed"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null ||
        fail "apt-get install chromium failed"
    [ -x /usr/bin/chromium ] || fail "apt-get installed chromium but /usr/bin/chromium is still missing"
fi

# --- Node.js and playwright-core -------------------------------------------------------------
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 ||
    fail "node and npm are needed (Node.js 20 or newer): install Node.js, e.g. 'apt-get install -y nodejs npm'"
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || fail "Node.js $(node --version) is too old: playwright-core needs 20 or newer"

# node_modules is up to date when it was installed from this very package-lock.json.
stamp="$here/node_modules/.meshbridge-lock.sha256"
want="$(sha256sum "$here/package-lock.json" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$here/node_modules/playwright-core/package.json" ]; then
    exit 0
fi
npm ci --prefix "$here" --no-audit --no-fund --loglevel=error >/dev/null ||
    fail "npm ci in tests/ui failed"
echo "$want" >"$stamp"
