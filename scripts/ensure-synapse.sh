#!/usr/bin/env bash
# Install Synapse, a real Matrix homeserver for tests/synapse/, into its own venv, idempotently:
# <repo>/.tools/synapse-venv (or $SYNAPSE_VENV), from PyPI, with every dependency pinned. Nothing is
# installed when the venv's stamp matches the pins. The tests start and stop the homeserver themselves.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SYNAPSE_VENV:-$ROOT/.tools/synapse-venv}"
PY="${PY:-python3}"
PIN="matrix-synapse==1.163.2"
CONSTRAINTS="$ROOT/tests/synapse/constraints.txt"
STAMP="$VENV/.synapse-installed"
WANT="$(printf '%s\n' "$PIN"; sha256sum < "$CONSTRAINTS")"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  echo "ensure-synapse: $VENV is current"
  exit 0
fi
echo "ensure-synapse: creating $VENV ($PIN, about 30 s)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -qq --disable-pip-version-check --constraint "$CONSTRAINTS" "$PIN"
printf '%s\n' "$WANT" > "$STAMP"
echo "ensure-synapse: installed $PIN"
