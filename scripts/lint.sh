#!/usr/bin/env bash
# ruff and mypy (strict) over the code, as CI runs them.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv "[dev]"
cd "$ROOT"
"$VENV/bin/ruff" check realtime tests bench loadtests
"$VENV/bin/ruff" format --check realtime
"$VENV/bin/mypy" realtime
