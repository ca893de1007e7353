#!/usr/bin/env bash
# Runs lobsterd's whole test suite: lint, types, unit, integration (root) and e2e (real VMs).
# Installs what the tests need first. Guest images are cached outside the repository in
# $LOBSTERD_TEST_CACHE (default /var/cache/lobsterd-test), keyed by their inputs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOBSTERD_VENV:-/opt/lobsterd/venv}"
cd "$repo"

"$repo/scripts/install.sh" --dev

echo "==> ruff"
"$venv/bin/ruff" check .
echo "==> mypy --strict"
"$venv/bin/mypy"

export LOBSTERD_TEST_CACHE="${LOBSTERD_TEST_CACHE:-/var/cache/lobsterd-test}"
echo "==> guest image (cached in $LOBSTERD_TEST_CACHE; rebuilt only when an input changed)"
cfg="$(mktemp)"
trap 'rm -f "$cfg"' EXIT
printf '[paths]\ncache_dir = "%s"\n' "$LOBSTERD_TEST_CACHE" > "$cfg"
"$venv/bin/lobsterd" --config "$cfg" image build
echo "==> pytest (unit, integration, e2e)"
"$venv/bin/pytest" "$@"
