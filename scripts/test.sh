#!/usr/bin/env bash
# Install everything into .venv, then run the test suite on every core (test files spread over the workers;
# each test runs torch on one thread). The demo's browser tests need chromium and chromium-driver (apt);
# without them they are skipped, unless CONDISTILL_REQUIRE_BROWSER=1 (CI) makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
