#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from nothing.
# Idempotent: re-installs only when setup.py or constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SHASPEC_VENV:-.venv}
PY=${PYTHON:-python3.10}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "bootstrap: $PY not found; install Python 3.10 (pyenv: 'pyenv install 3.10'; this repo's .python-version selects it)" >&2
  exit 1
fi
stamp="$VENV/.shaspec-installed"
want=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
echo "bootstrap: installing pinned packages into $VENV (first time: a few minutes)"
# Hide pip's notes about this machine's optional local package indexes; errors still fail the script (pipefail).
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet "$VENV/bin/python" -m pip install -q --upgrade "pip<25" "setuptools<70" wheel
quiet "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[pipeline,serving,test]"
echo "$want" > "$stamp"
echo "bootstrap: ready ($VENV)"
