#!/usr/bin/env bash
# Set up fedprune from a fresh clone: a virtual environment in .venv with the package installed.
#   bash scripts/setup.sh          aggregator + agent (enough to run fedprune-simulate)
#   bash scripts/setup.sh dev      + test tools, and Mosquitto from Debian's packages for the tests
set -euo pipefail
cd "$(dirname "$0")/.."
extras="aggregator,agent"
if [ "${1:-}" = "dev" ]; then
  extras="dev"
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    else
      echo "Mosquitto is needed for the tests: sudo apt-get install -y mosquitto mosquitto-clients" >&2
      exit 1
    fi
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "fedprune installed in .venv (extras: ${extras})"
