#!/usr/bin/env bash
# Installs everything the test suite needs, from scratch, then runs the whole suite.
# This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# System tools used by the integration tests and benchmarks.
if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        iproute2 curl openssl nghttp2-client nginx-light shellcheck >/dev/null
fi

python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[test]'

python3 -m pytest "$@"
