# Sourced by scripts/serve and scripts/test: the project's virtual environment,
# created on first use with the python3 first on the PATH (Debian's and
# Ubuntu's own python3 refuse `pip install` outside one: PEP 668,
# "externally-managed-environment"). Sets PY to its interpreter and installs
# the project into it (editable, with the extras in $1, e.g. "test").
# FIRSTPARTY_VENV picks another directory (default: .venv in the checkout).
VENV="${FIRSTPARTY_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    # Debian/Ubuntu ship venv's pip bootstrap apart: python3-venv.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "scripts/venv.sh: apt-get install python3-venv" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    else
      echo "scripts/venv.sh: python3 cannot create a virtual environment; install python3-venv (sudo apt install python3-venv)" >&2
      exit 1
    fi
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "scripts/venv.sh: $VENV has Python $("$PY" -c 'import platform; print(platform.python_version())'); 3.11 or newer is needed (remove $VENV and put a newer python3 first on the PATH)" >&2
  exit 1
fi
extras="${1:-}"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
