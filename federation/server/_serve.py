"""Running the federation service: TLS material, etcd (external or embedded), the hub, gRPC.

Two listeners share one set of handlers:

* ``--listen`` (default ``0.0.0.0:7443``): mutual TLS, client certificates required
  and verified against the federation bundle.  Every call.
* ``--join-listen`` (default: the same host, port + 1): server-auth TLS only, for
  :rpc:`Join` by clusters that have no certificate yet.  It is reachable without any
  credential, so it is a server of its own that serves Join alone, with a small message
  limit (a CSR is ~2 KiB) and few concurrent calls, behind a TCP relay
  (:class:`JoinFront`) that caps connections per source IP.  (grpcio cannot make a
  client certificate optional on one port, hence two.)

``--metrics-listen`` (off by default) serves Prometheus metrics, e.g.
``isthmus_federation_invalid_records_total{kind}``.

The server certificate is a leaf signed by the root with ``spiffe://<td>/federation`` and
DNS/IP names for every address it is reached by, re-issued before it expires (the
credentials fetcher runs on each handshake).  It is served with the root appended so a
joining client can pin the root from the handshake alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import trust

from ._embedded import EmbeddedEtcd
from .._errors import FederationError, InvalidRequest, StoreUnavailable
from .._hostport import is_loopback
from ._etcd import Etcd, EtcdTls
from ._hub import Hub
from ._server import FederationService
from ._store import MAX_STATUS_TTL, MIN_STATUS_TTL, STATUS_TTL, Store
from ..proto import federation_pb2 as pb
from ..proto import federation_pb2_grpc as pb_grpc

log = structlog.get_logger("federation.serve")

MAX_MESSAGE = 256 * 1024 * 1024  # a 50k-service snapshot is ~15 MB; leave ample room
# The join port: a CSR is ~2 KiB, the reply carries the bundle and the CRL.
JOIN_MAX_MESSAGE = 64 * 1024
JOIN_MAX_REPLY = 16 * 1024 * 1024
JOIN_MAX_CALLS = 16  # in flight at once, whoever calls
JOIN_MAX_STREAMS = 4  # per connection
JOIN_CONNECTIONS_PER_IP = 8
JOIN_CONNECTIONS = 256
JOIN_CONNECTION_LIFETIME = 60.0  # a join takes well under a second
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name
SERVER_CERT_VALIDITY = 24 * 3600.0


def _base_data_dir() -> Path:
    """The folder the per-root data dirs live in (``_datadir.default_data_dir``)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("isthmus")) / "federation"


def split_hostport(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise FederationError(f"invalid {what} {text!r}: expected HOST:PORT, e.g. 0.0.0.0:7443")
    return host.strip("[]"), int(port)


@dataclass
class ServeConfig:
    trust_dir: Path
    listen: str = "0.0.0.0:7443"
    join_listen: str = ""
    etcd: str = ""  # empty: embedded etcd
    etcd_prefix: str = "/isthmus/"
    etcd_tls: EtcdTls | None = None  # client TLS to https:// endpoints
    etcd_wait: float = 60.0  # seconds to wait for etcd at start before giving up
    data_dir: Path = field(default_factory=_base_data_dir)  # the CLI scopes it to the root
    advertise: tuple[str, ...] = ()
    passphrase: bytes | None = None
    queue_size: int = 256
    trust_sync_interval: float = 5.0
    liveness_interval: float = 2.0  # how often the leader looks for clusters turned STALE
    metrics_listen: str = ""  # HOST:PORT for Prometheus metrics; empty: off
    status_ttl: int = STATUS_TTL  # lease of a gateway's status entry (seconds)
    # The topology page (_web): HOST:PORT; "auto": 127.0.0.1 at the --listen port + 2
    # (not fatal when taken); "" or "off": none.
    web_listen: str = ""
    web_token_file: Path | None = None
    prometheus: str = ""  # the page reads traffic from this Prometheus instead of the summaries

    def web_address(self) -> str:
        if self.web_listen in ("", "off"):
            return ""
        if self.web_listen == "auto":
            _, port = split_hostport(self.listen, "--listen address")
            return f"127.0.0.1:{port + 2}"
        return self.web_listen

    def __post_init__(self) -> None:
        web = self.web_address()
        if web and not self.web_token_file:
            host, _ = split_hostport(web, "--web-listen address")
            if not is_loopback(host):
                raise InvalidRequest(
                    f"--web-listen {web}: the topology page binds to a non-loopback address only with "
                    "--web-token-file (a login token); or bind it to 127.0.0.1 and use kubectl port-forward")
        if not MIN_STATUS_TTL <= self.status_ttl <= MAX_STATUS_TTL:
            raise InvalidRequest(
                f"invalid --status-ttl {self.status_ttl}: use between {MIN_STATUS_TTL} and {MAX_STATUS_TTL} seconds"
            )

    def join_address(self) -> str:
        if self.join_listen:
            return self.join_listen
        host, port = split_hostport(self.listen, "--listen address")
        return f"{host}:{port + 1}" if ":" not in host else f"[{host}]:{port + 1}"


def _names_for(listen: str, advertise: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses the server certificate must carry."""
    dns, ips = ["localhost"], ["127.0.0.1", "::1"]
    host, _ = split_hostport(listen, "--listen address")
    candidates = list(advertise)
    if host in ("0.0.0.0", "::"):
        candidates.append(socket.gethostname())
        with contextlib.suppress(OSError):
            candidates += [ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None)]
    else:
        candidates.append(host)
    for name in candidates:
        try:
            ip = str(ipaddress.ip_address(name))
            if ip not in ips:
                ips.append(ip)
        except ValueError:
            if name not in dns:
                dns.append(name)
    return dns, ips


class ServerCertificate:
    """Issues the server leaf and re-issues it when half its life is gone."""

    def __init__(self, td: trust.TrustDir, out_dir: Path, dns: list[str], ips: list[str]) -> None:
        self.td, self.out_dir, self.dns, self.ips = td, out_dir, dns, ips
        self.cert: object = None
        self.config = self._issue()

    def _issue(self) -> grpc.ServerCertificateConfiguration:
        files = self.td.issue_server(
            trust.federation_server_id(self.td.trust_domain),
            self.out_dir,
            dns_names=self.dns,
            ip_addresses=self.ips,
            validity=SERVER_CERT_VALIDITY,
        )
        self.cert = trust.load_cert(files.cert)
        chain = files.cert.read_bytes() + self.td.root_cert_path.read_bytes()
        log.info("server_cert.issued", dns=self.dns, ips=self.ips, spiffe_id=str(trust.federation_server_id(self.td.trust_domain)))
        return grpc.ssl_server_certificate_configuration(
            [(files.key.read_bytes(), chain)], root_certificates=self.td.bundle_pem()
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc on every handshake: cheap unless rotation is due.
        if trust.rotation_due(self.cert, dt.datetime.now(dt.timezone.utc)):  # type: ignore[arg-type]
            self.config = self._issue()
            return self.config
        return None


class Election:
    """Leader election on an etcd key bound to a lease (for background jobs).

    The holder keeps its lease alive; when it stops, the key vanishes with the lease
    and another replica takes over within the TTL.
    """

    def __init__(self, etcd: Etcd, key: bytes, ttl: int = 5) -> None:
        self.etcd, self.key, self.ttl = etcd, key, ttl
        # Who holds it, readable by an operator (`etcdctl get <prefix>election/trust-sync`):
        # host and pid, and a nonce (a pid is reused across restarts).
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self.leader = False
        self._lease = 0

    async def step(self) -> bool:
        """Campaign or renew once; return whether we lead now."""
        if self.leader:
            if await self.etcd.keepalive_once(self._lease) > 0:
                return True
            self.leader = False
            log.warning("election.lost", key=self.key.decode(), id=self.me.decode())
        self._lease, _ = await self.etcd.grant(self.ttl)
        resp = await self.etcd.txn(
            compare=[self.etcd.cmp_missing(self.key)],
            success=[self.etcd.op_put(self.key, self.me, self._lease)],
        )
        self.leader = resp.succeeded
        if self.leader:
            log.info("election.won", key=self.key.decode(), id=self.me.decode(), ttl=self.ttl)
        else:
            await self.etcd.revoke(self._lease)
        return self.leader


class JoinFront:
    """The join port: relays TCP to the join server, at most ``per_ip`` connections per
    source IP (and ``total`` in all), each for at most ``lifetime`` seconds.

    TLS stays end to end (the relay sees only ciphertext); it exists because grpcio has
    no per-client connection limit, and the join port needs no credential to reach.
    """

    def __init__(self, upstream_port: int, per_ip: int = JOIN_CONNECTIONS_PER_IP, total: int = JOIN_CONNECTIONS,
                 lifetime: float = JOIN_CONNECTION_LIFETIME) -> None:
        self.upstream_port = upstream_port
        self.per_ip, self.total, self.lifetime = per_ip, total, lifetime
        self.by_ip: dict[str, int] = {}
        self.refused = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        try:
            return await asyncio.start_server(self._handle, host, port, reuse_address=True)
        except OSError as exc:
            raise FederationError(f"cannot listen on {host}:{port} (join): {exc.strerror}") from None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = str((writer.get_extra_info("peername") or ("?",))[0])
        if self.by_ip.get(ip, 0) >= self.per_ip or sum(self.by_ip.values()) >= self.total:
            self.refused += 1
            log.warning("join.connection_refused", peer=ip, per_ip=self.per_ip, open=self.by_ip.get(ip, 0))
            writer.transport.abort()
            return
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.lifetime):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                pipes = [asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))]
                try:
                    await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in pipes:
                        t.cancel()
                    await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, TimeoutError):
            pass
        finally:
            self.by_ip[ip] -= 1
            if not self.by_ip[ip]:
                del self.by_ip[ip]
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(64 * 1024):
        writer.write(data)
        await writer.drain()  # backpressure: at most one read in flight per direction


class _JoinOnly(pb_grpc.FederationServicer):
    """The join server's servicer: Join, and nothing else (UNIMPLEMENTED)."""

    def __init__(self, service: FederationService) -> None:
        self.Join = service.Join  # type: ignore[method-assign]


def _add_port(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials, what: str) -> int:
    # grpcio returns 0 or, in newer releases, raises RuntimeError when the bind fails.
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        raise FederationError(f"cannot listen on {address} ({what}): address in use or not local")
    return port


def _serve_metrics(listen: str) -> object:
    from prometheus_client import start_http_server

    host, port = split_hostport(listen, "--metrics-listen address")
    try:
        server, _thread = start_http_server(port, host)
    except OSError as exc:
        raise FederationError(f"cannot listen on {listen} (metrics): {exc.strerror}") from None
    log.info("metrics.serving", listen=listen)
    return server


async def _trust_sync(store: Store, td: trust.TrustDir, interval: float) -> None:
    """Mirror the trust folder's bundle and CRL into etcd (leader only), e.g. after a revoke."""
    election = Election(store.etcd, store.keys.k("election", "trust-sync"))
    synced_crl: bytes | None = None  # the CRL last mapped onto cluster records here
    while True:
        try:
            if await election.step():
                bundle, crl = await asyncio.to_thread(lambda: (td.bundle_pem(), td.crl_pem()))
                await store.publish_trust(bundle, crl)
                # Revocations made offline (`isthmus trust revoke-cluster`) mark the record
                # too; the records need a look only when the CRL changed.
                if crl != synced_crl:
                    await store.sync_revoked(crl)
                    synced_crl = crl
            else:
                synced_crl = None  # a later leadership starts with a full pass
        except (FederationError, trust.TrustError) as exc:
            log.warning("trust_sync.failed", error=str(exc))
        await asyncio.sleep(interval)


async def _liveness_sync(store: Store, interval: float) -> None:
    """Keep the ``liveness/`` records current (leader only): which clusters are STALE."""
    election = Election(store.etcd, store.keys.k("election", "liveness"))
    while True:
        try:
            if await election.step():
                await store.sync_liveness()
        except FederationError as exc:
            log.warning("liveness_sync.failed", error=str(exc))
        await asyncio.sleep(interval)


async def _start_web(cfg: ServeConfig, service: FederationService) -> object:
    """The topology page (federation/server/_web.py), or None.  A taken port is fatal only
    when the address was given (the "auto" default logs it and serves on without)."""
    address = cfg.web_address()
    if not address:
        return None
    from ._web import WebListenFailed, start_web

    try:
        return await start_web(service, address, cfg.web_token_file, cfg.prometheus)
    except WebListenFailed as exc:
        if cfg.web_listen != "auto":
            raise
        log.warning("web.not_serving", error=str(exc), message="the topology page is off; pass --web-listen")
        return None


async def serve(cfg: ServeConfig) -> None:
    td = trust.TrustDir(cfg.trust_dir, cfg.passphrase)
    if not td.exists():
        raise FederationError(
            f"trust folder {cfg.trust_dir} has no root: run `isthmus trust init --dir {cfg.trust_dir}` first"
        )
    fed_td = td.trust_domain
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.data_dir, 0o700)

    embedded: EmbeddedEtcd | None = None
    endpoints = cfg.etcd
    if not endpoints and cfg.etcd_tls is not None:
        raise FederationError("etcd client TLS options need --etcd https://HOST:PORT[,...] (the embedded etcd "
                              "listens on loopback only, without TLS)")
    if not endpoints:
        embedded = EmbeddedEtcd(cfg.data_dir / "etcd-embedded")
        embedded.start()
        endpoints = embedded.endpoint
        log.warning(
            "etcd.embedded",
            message="no --etcd given: started an embedded single-member etcd (fine for a demo or one machine; "
            "run an etcd cluster and pass --etcd for production)",
            endpoint=endpoints,
            data_dir=str(embedded.data_dir),
        )
    etcd = Etcd(endpoints, tls=cfg.etcd_tls)
    await etcd.connect()
    store = Store(etcd, cfg.etcd_prefix, cfg.status_ttl)
    hub = Hub(etcd, store.keys, cfg.queue_size)
    tasks: list[asyncio.Task[None]] = []
    metrics: object = None
    join_front: asyncio.Server | None = None
    web_runner: object = None
    join_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", JOIN_MAX_MESSAGE),
            ("grpc.max_send_message_length", JOIN_MAX_REPLY),
            ("grpc.max_concurrent_streams", JOIN_MAX_STREAMS),
            ("grpc.max_connection_age_ms", int(JOIN_CONNECTION_LIFETIME * 1000)),
        ],
        maximum_concurrent_rpcs=JOIN_MAX_CALLS,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    try:
        # etcd may still be starting (or briefly away): publishing trust waits for it,
        # up to --etcd-wait, saying why every few seconds (a TLS mistake shows here).
        deadline = time.monotonic() + cfg.etcd_wait
        said = 0.0
        while True:
            try:
                await store.publish_trust(td.bundle_pem(), td.crl_pem())
                break
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"{exc} (waited {cfg.etcd_wait:g}s at start; check --etcd, and for https:// endpoints "
                        "--etcd-ca, --etcd-cert and --etcd-key)") from None
                if time.monotonic() - said >= 5:
                    said = time.monotonic()
                    log.warning("etcd.waiting", error=str(exc), endpoints=endpoints)
                await asyncio.sleep(0.2)
        tasks.append(asyncio.create_task(hub.run(), name="hub"))
        tasks.append(asyncio.create_task(_trust_sync(store, td, cfg.trust_sync_interval), name="trust-sync"))
        tasks.append(asyncio.create_task(_liveness_sync(store, cfg.liveness_interval), name="liveness-sync"))
        await asyncio.wait_for(hub.ready.wait(), 30)

        if cfg.metrics_listen:
            metrics = _serve_metrics(cfg.metrics_listen)
        dns, ips = _names_for(cfg.listen, cfg.advertise)
        certs = ServerCertificate(td, cfg.data_dir / "server-tls", dns, ips)
        service = FederationService(store, hub, td)
        pb_grpc.add_FederationServicer_to_server(service, server)
        pb_grpc.add_FederationServicer_to_server(_JoinOnly(service), join_server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, join_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        mtls = grpc.dynamic_ssl_server_credentials(certs.config, certs.fetch, require_client_authentication=True)
        server_auth = grpc.dynamic_ssl_server_credentials(certs.config, certs.fetch, require_client_authentication=False)
        _add_port(server, cfg.listen, mtls, "mtls")
        join_port = _add_port(join_server, "127.0.0.1:0", server_auth, "join server, behind the join port")
        await server.start()
        await join_server.start()
        join_front = await JoinFront(join_port).start(*split_hostport(cfg.join_address(), "--join-listen address"))
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "federation.serving",
            listen=cfg.listen,
            join_listen=cfg.join_address(),
            trust_domain=fed_td,
            etcd=endpoints,
            prefix=cfg.etcd_prefix,
            revision=hub.revision,
            pid=os.getpid(),
        )
        web_runner = await _start_web(cfg, service)  # after the API: the page is no part of it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        done_wait = asyncio.create_task(stop.wait())
        finished, _ = await asyncio.wait([done_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in finished:
            if t is not done_wait and t.exception():
                raise t.exception()  # type: ignore[misc]
        log.info("federation.stopping")
    finally:
        if web_runner is not None:
            await web_runner.cleanup()  # type: ignore[attr-defined]
        if join_front is not None:
            join_front.close()
        await join_server.stop(grace=0.5)
        await server.stop(grace=1.0)
        if metrics is not None:
            metrics.shutdown()  # type: ignore[attr-defined]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await etcd.close()
        if embedded is not None:
            embedded.stop()
