#!/usr/bin/env bash
# Run the gateway on the embedded default (memory broker, no Redis), in dev mode:
# missing secrets are generated into .realtime/dev-secrets.toml and printed.
# Extra arguments go to `realtime serve` (e.g. --config config/examples/chat.toml).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
ensure_venv ""
cd "$ROOT"
exec "$VENV/bin/realtime" serve --dev "$@"
