#!/usr/bin/env bash
# Create bench/peers/.venv with the pinned peer libraries of requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
test -x "$here/.venv/bin/python" || "$python" -m venv "$here/.venv"
"$here/.venv/bin/python" -m pip install --quiet --upgrade pip
"$here/.venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
"$here/.venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(dbos|huey|pgqueuer|asyncpg|psycopg|psycopg-binary|uvloop|sqlalchemy)=='
