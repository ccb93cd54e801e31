#!/usr/bin/env bash
# Install what the browser end-to-end tests (tests/e2e) need, idempotently:
#   - Debian's chromium (/usr/bin/chromium) and, if absent, node + npm;
#   - this directory's npm packages (playwright-core, mixpanel-browser,
#     @segment/analytics-next; the server SDKs mixpanel, @segment/analytics-node,
#     analytics-node 6) from
#     the committed package-lock.json (npm ci), re-installed only when
#     node_modules is missing or was installed from other manifests.
# Never downloads a browser build of its own (no `playwright install`).
# Works as root on a fresh Debian with CI=true and no stdin.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 PUPPETEER_SKIP_DOWNLOAD=1 SE_SKIP_DRIVER_IN_PATH=1
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq </dev/null
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
# Firefox ESR: the cross-domain journeys in a second engine (WebDriver BiDi, no geckodriver).
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
# WebKitGTK: MiniBrowser and WebKitWebDriver (webkit2gtk-driver), on a virtual display (Xvfb).
[ -x /usr/bin/WebKitWebDriver ] || missing+=(webkit2gtk-driver)
[ -x /usr/bin/Xvfb ] || missing+=(xvfb)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/e2e/install.sh: apt-get install ${missing[*]}" >&2
  # fonts: chromium needs at least one to lay out pages headless.
  apt_install "${missing[@]}" fonts-liberation ca-certificates
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "tests/e2e/install.sh: playwright-core needs Node.js >= 20, this machine has $(node --version)" >&2
  exit 1
fi

# The hash of the manifests that node_modules was installed from.
manifests_hash() { cat package.json package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1 || true; }
want=$(manifests_hash)
stamp=node_modules/.firstparty-e2e-stamp
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || [ ! -f node_modules/playwright-core/package.json ] || [ ! -f node_modules/mixpanel-browser/package.json ] \
   || [ ! -f node_modules/@segment/analytics-next/package.json ] || [ ! -f node_modules/mixpanel/package.json ] \
   || [ ! -f node_modules/@segment/analytics-node/package.json ] || [ ! -f node_modules/analytics-node/package.json ] \
   || [ ! -f node_modules/mixpanel-browser-2.45/package.json ] || [ ! -f node_modules/mixpanel-browser-2.55/package.json ] \
   || [ ! -f node_modules/puppeteer-core/package.json ] || [ ! -f node_modules/selenium-webdriver/package.json ]; then
  if [ -f package-lock.json ]; then
    echo "tests/e2e/install.sh: npm ci" >&2
    npm ci --no-audit --no-fund --loglevel=error </dev/null
  else
    echo "tests/e2e/install.sh: npm install (no package-lock.json)" >&2
    npm install --no-audit --no-fund --loglevel=error </dev/null
    want=$(manifests_hash)
  fi
  echo "$want" >"$stamp"
fi

# (Debian's launcher script may print a harmless shell warning on stderr.)
echo "tests/e2e/install.sh: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium does not start')" >&2
echo "tests/e2e/install.sh: $(/usr/bin/firefox-esr --version 2>/dev/null || echo 'firefox-esr does not start')" >&2
echo "tests/e2e/install.sh: WebKitGTK $(dpkg-query -W -f='${Version}' libwebkit2gtk-4.1-0 2>/dev/null || echo 'not installed')" >&2
node -e 'console.error("tests/e2e/install.sh: playwright-core " + require("playwright-core/package.json").version + ", mixpanel-browser " + require("mixpanel-browser/package.json").version + ", @segment/analytics-next " + require("@segment/analytics-next/package.json").version)'
