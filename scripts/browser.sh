#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the web playground's end-to-end test (tests/test_web.py).
# Installed where this machine can (root with apt-get); a failed install there is an error. Elsewhere
# nothing is installed and the reason is printed: the web test then skips, saying why.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium and chromium-driver for the web test (apt-get) ..."
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    echo "chromium could not be installed (apt-get install chromium chromium-driver failed)" >&2
    exit 1
  fi
else
  echo "chromium is not installed and cannot be here (not root, or no apt-get): the web test will skip;" \
       "to run it: sudo apt-get install chromium chromium-driver"
fi
