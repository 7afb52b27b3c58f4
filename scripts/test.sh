#!/usr/bin/env bash
# Run the test suite on a fresh machine: system packages the tests need, the virtualenv,
# then pytest. Extra arguments go to pytest (e.g. -k recovery, -x).
set -euo pipefail
source "$(dirname "$0")/_env.sh"

# System programs the tests drive as real peers (none of them is mocked). Listed as
# "command:debian-package"; installed with apt-get when the command is missing.
SYSTEM_DEPS=("mosquitto_sub:mosquitto-clients" "mosquitto_pub:mosquitto-clients"
            "redis-server:redis-server")
missing=()
for dep in "${SYSTEM_DEPS[@]}"; do
    command -v "${dep%%:*}" >/dev/null || missing+=("${dep##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

ensure_venv "[test]"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
