#!/usr/bin/env bash
# `make run`: the daemon on the embedded SQLite store (./.state/) with the development config.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .state
exec .venv/bin/syncd run --config "${SYNCD_CONFIG:-config/syncd.dev.toml}"
