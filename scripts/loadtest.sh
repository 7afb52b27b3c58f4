#!/usr/bin/env bash
# Run a locust swarm against a gateway (loadtests/README.md): the virtualenv with the
# [test] extra (locust, websocket-client, paho-mqtt), then locust from the repository
# root. Extra arguments go to locust, e.g. --config loadtests/profiles/smoke.conf.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv "[test]"
cd "$ROOT"
exec "$VENV/bin/locust" "$@"
