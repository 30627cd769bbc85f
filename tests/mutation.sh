#!/usr/bin/env bash
# Mutation testing of identity, authorization, revocation, token and policy code with
# cosmic-ray (tests/mutation/run.py says how). Not part of CI: it runs for tens of
# minutes. Needs the test dependencies (tests/run.sh) and cosmic-ray.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip show cosmic-ray >/dev/null 2>&1 || python3 -m pip install -q -e '.[mutation]'
exec python3 tests/mutation/run.py "$@"
