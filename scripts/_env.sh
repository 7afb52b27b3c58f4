# Shared by scripts/serve.sh and scripts/test.sh: a project virtualenv that follows
# pyproject.toml. Sourced, not run.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REALTIME_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {  # ensure_venv EXTRAS  (e.g. "" or "[test]")
    local extras="$1"
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1))." >&2
        echo "Install it, or point PYTHON= at one." >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        echo "installing python3-venv" >&2
        apt_install python3-venv
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtualenv in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml or the extras changed.
    local stamp="$VENV/.installed-$(echo "$extras" | tr -dc 'a-z')"
    local want
    want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing the gateway and its Python packages into $VENV (log: $VENV/install.log)" >&2
        if ! { "$VENV/bin/python" -m pip install --upgrade pip \
               && "$VENV/bin/python" -m pip install -e "$ROOT$extras"; } > "$VENV/install.log" 2>&1
        then
            tail -n 30 "$VENV/install.log" >&2
            echo "installing Python packages failed; full log: $VENV/install.log" >&2
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

apt_install() {  # apt_install PACKAGE...  (only what is missing; needs root or sudo)
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null; then sudo="sudo"; else
            echo "missing system packages: $* (run as root or install them)" >&2; exit 1
        fi
    fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}
