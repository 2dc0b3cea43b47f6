#!/usr/bin/env bash
# Set up fedprune from a fresh clone: a virtual environment in .venv with the package installed.
#   bash scripts/setup.sh          aggregator + agent (enough to run fedprune-simulate)
#   bash scripts/setup.sh dev      + test tools, and from Debian's packages Mosquitto (the tests'
#                                  second broker) and Chromium (the status page's browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="aggregator,agent"
if [ "${1:-}" = "dev" ]; then
  extras="dev"
  missing=""
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing="mosquitto mosquitto-clients"
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    missing="$missing chromium"
  fi
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      # shellcheck disable=SC2086 - one word per package
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    elif [ "${missing#*mosquitto}" != "$missing" ]; then
      echo "Mosquitto is needed for the tests: sudo apt-get install -y$missing" >&2
      exit 1
    else
      echo "Chromium is needed for the status page's browser test (skipped without it outside CI):" \
           "sudo apt-get install -y chromium" >&2
    fi
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "fedprune installed in .venv (extras: ${extras})"
