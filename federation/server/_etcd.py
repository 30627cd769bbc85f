"""A small asyncio etcd v3 client over aetcd's generated gRPC stubs.

Why not aetcd's high-level ``Client`` alone: the federation needs range requests at a
past revision, ``keys_only``/``min_mod_revision`` filters, raw watch responses (their
header revision and per-revision grouping are what the watch API tags messages with)
and several endpoints.  aetcd ships the etcd protos as ``aetcd.rpc``; this module is a
thin typed shell over them that converts gRPC failures into :mod:`federation` errors at
one place.

Several endpoints (``--etcd URL,URL,URL``), as etcd's own clientv3 does:

* One channel balances calls round-robin over the members it can reach; a killed
  member's connection fails and its calls go to the others.  Every call carries
  etcd's require-leader metadata, so a member that lost its leader (it is in a
  minority, or an election is on) refuses at once with "no leader" instead of holding
  the call until it times out, and a watch on it is cancelled (the hub resumes it on
  another member).
* What is safe to retry is retried within the call's deadline (:meth:`Etcd._call`):
  reads, lease keep-alives and time-to-live, revokes — on any unavailability; writes
  (put, txn, grant, compact) only when etcd refused them before proposing them ("no
  leader"), never after a timeout or a lost connection, where a write may or may not
  have been committed (at-most-once, like clientv3's ``isSafeRetryMutableRPC``).  Those
  fail with :class:`StoreUnavailable`; the API caller's own retry is safe because every
  federation write is "make it so" (a publish replaces the whole export set) or
  compare-and-swap.
* etcd names its errors by their description (clientv3's ``rpctypes``): :func:`_convert`
  is the one place that maps those to types.

Client TLS (``--etcd https://...`` with :class:`EtcdTls`): the members' certificates are
verified against the CA given, and a client certificate is presented when one is given
(etcd's ``--client-cert-auth``).  With several endpoints the channel dials an address
list, so the name checked in every member's certificate is one name: the first
endpoint's host unless ``server_name`` says otherwise (etcd member certificates usually
carry a shared name, e.g. the headless Service's).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import structlog
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as stubs

from .._errors import Compacted, FederationError, StoreUnavailable

log = structlog.get_logger("federation.etcd")

T = TypeVar("T")
# How often names are resolved again while etcd is unreachable (see Etcd.reresolve).
RERESOLVE_INTERVAL = 10.0
# Keys per page of a prefix read (Etcd.get_prefix): a few MiB of typical records.
RANGE_PAGE = 5000
DEFAULT_TIMEOUT = 5.0
# A read stuck on a member whose leader died mid-request is abandoned after this long and
# retried on another member; an election takes one to two seconds.
ATTEMPT_TIMEOUT = 2.0
# "No leader" is retried this long: longer than an election, short enough that a caller
# learns of a lost quorum before its own deadline (``isthmus status``: 10 s).
NO_LEADER_BUDGET = 3.0
_REQUIRE_LEADER = (("hasleader", "true"),)  # clientv3's WithRequireLeader
_NO_LEADER = "etcdserver: no leader"


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def parse_endpoints(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"http://a:2379,b:2379"`` -> ``[("a", 2379), ("b", 2379)]`` with clear errors."""
    return _parse(spec)[1]


def _parse(spec: str | Sequence[str]) -> tuple[str, list[tuple[str, int]]]:
    """The endpoints' scheme (``http`` or ``https``: one for all) and ``(host, port)`` each."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, int]] = []
    schemes: set[str] = set()
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme not in ("http", "https"):
            raise FederationError(
                f"invalid etcd endpoint {raw!r}: use http://HOST:PORT, or https://HOST:PORT with --etcd-ca"
            )
        if not url.hostname or not url.port:
            raise FederationError(f"invalid etcd endpoint {raw!r}: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT")
        schemes.add(url.scheme)
        out.append((url.hostname, url.port))
    if not out:
        raise FederationError("invalid etcd endpoints: none given")
    if len(schemes) > 1:
        raise FederationError("invalid etcd endpoints: some are http://, some https://; one etcd cluster speaks one")
    return schemes.pop(), out


@dataclass(frozen=True)
class EtcdTls:
    """Client TLS to etcd: the CA that signed the members' certificates, and the client
    certificate and key to present when etcd checks them (``--client-cert-auth``)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # the name checked in the members' certificates; "": the first endpoint's host

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files (clear errors naming the option and the file)."""
        if (self.cert_file is None) != (self.key_file is None):
            raise FederationError("etcd client TLS: give --etcd-cert and --etcd-key together (or neither)")

        def read(path: Path, option: str, marker: bytes) -> bytes:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise FederationError(f"cannot read {option} {path}: {exc.strerror}") from None
            if marker not in data:
                raise FederationError(f"{option} {path} is not a PEM file (no '{marker.decode()}' line)")
            return data

        ca = read(self.ca_file, "--etcd-ca", b"-----BEGIN CERTIFICATE-----")
        if self.cert_file is None or self.key_file is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=read(self.key_file, "--etcd-key", b"PRIVATE KEY-----"),
            certificate_chain=read(self.cert_file, "--etcd-cert", b"-----BEGIN CERTIFICATE-----"),
        )


def _target(endpoints: list[tuple[str, int]]) -> str:
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Several endpoints: gRPC's ipv4: resolver takes an address list, which the channel
    # balances over (round_robin); names are resolved here, again by Etcd.reresolve.
    addrs: list[str] = []
    for host, port in endpoints:
        for fam, *_rest, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if fam == socket.AF_INET:
                addrs.append(f"{sa[0]}:{port}")
                break
        else:
            raise FederationError(f"invalid etcd endpoint {host}:{port}: no IPv4 address")
    return "ipv4:" + ",".join(addrs)


async def _close_later(channel: grpc.aio.Channel, grace: float) -> None:
    await asyncio.sleep(grace)
    await channel.close()


class _TooLarge(FederationError):
    """RESOURCE_EXHAUSTED: a reply over the channel's message limit (or etcd out of space)."""


class _NoLeader(StoreUnavailable):
    """The member has no leader and refused the call before proposing it (safe to retry)."""


def _convert(exc: grpc.aio.AioRpcError) -> FederationError:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and details == _NO_LEADER:
        return _NoLeader(
            "the federation's etcd is unavailable: no leader (etcdserver: no leader): fewer than a quorum "
            "of its members are up or can reach each other; gateways keep serving their last config"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return StoreUnavailable(f"the federation's etcd is unavailable: {code.name}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(0, 0)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _TooLarge(f"etcd error: {code.name}: {details}")
    return FederationError(f"etcd error: {code.name}: {details}")


class Etcd:
    """Connection to an etcd cluster (one gRPC channel, several endpoints with failover)."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT,
                 tls: EtcdTls | None = None) -> None:
        scheme, self.endpoints = _parse(endpoints)
        if scheme == "https" and tls is None:
            raise FederationError(
                "https:// etcd endpoints need the CA that signed etcd's certificates: --etcd-ca FILE "
                "(and --etcd-cert/--etcd-key when etcd checks client certificates)")
        if scheme == "http" and tls is not None:
            raise FederationError("etcd client TLS options given, but the etcd endpoints are http://: "
                                  "write them as https://HOST:PORT")
        self._credentials = tls.credentials() if tls is not None else None
        self._server_name = (tls.server_name or self.endpoints[0][0]) if tls is not None else ""
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._target = ""
        self._resolved_at = 0.0
        self._retired: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        self._open(_target(self.endpoints))

    def _open(self, target: str) -> None:
        self._target = target
        self._resolved_at = time.monotonic()
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", self._server_name))
            self._channel = grpc.aio.secure_channel(target, self._credentials, options=options)
        self.kv = stubs.KVStub(self._channel)
        self.lease = stubs.LeaseStub(self._channel)
        self.watch_stub = stubs.WatchStub(self._channel)
        self.maintenance = stubs.MaintenanceStub(self._channel)

    async def reresolve(self) -> bool:
        """After a failure: when the endpoints' names now resolve to other addresses (an
        etcd pod rescheduled with a new IP), move to a new channel.  At most every
        :data:`RERESOLVE_INTERVAL`; True if it moved.  (Several endpoints are resolved
        once into a static address list, which gRPC never re-resolves by itself.)"""
        if len(self.endpoints) < 2 or time.monotonic() - self._resolved_at < RERESOLVE_INTERVAL:
            return False
        self._resolved_at = time.monotonic()
        try:
            target = await asyncio.to_thread(_target, self.endpoints)
        except FederationError:
            return False
        if target == self._target:
            return False
        log.warning("etcd.endpoints_moved", before=self._target, after=target)
        old = self._channel
        self._open(target)
        if old is not None:  # let calls in flight on it finish or fail by themselves
            task = asyncio.get_running_loop().create_task(_close_later(old, self.timeout))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return True

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Etcd:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, attempt: Callable[[float], Awaitable[T]], *, idempotent: bool) -> T:
        """Run ``attempt(timeout)`` until it succeeds, fails for good, or the deadline
        (``self.timeout``) passes; what is retried is in the module docstring."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout
        backoff = 0.05
        while True:
            remaining = deadline - loop.time()
            try:
                return await attempt(min(remaining, ATTEMPT_TIMEOUT) if idempotent else remaining)
            except grpc.aio.AioRpcError as exc:
                err = _convert(exc)
            if isinstance(err, StoreUnavailable):
                await self.reresolve()
            now = loop.time()
            retry = isinstance(err, _NoLeader) and now - start < NO_LEADER_BUDGET
            retry = retry or (idempotent and type(err) is StoreUnavailable)
            if not retry or now + backoff >= deadline:
                raise err
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    def _unary(self, stub: str, method: str, request: Any, *, idempotent: bool) -> Awaitable[Any]:
        # The stub is looked up on every attempt: reresolve() may have replaced it.
        return self._call(
            lambda timeout: getattr(getattr(self, stub), method)(
                request, timeout=timeout, metadata=_REQUIRE_LEADER, wait_for_ready=True),
            idempotent=idempotent,
        )

    # ------------------------------------------------------------------ KV
    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        revision: int = 0,
        keys_only: bool = False,
        min_mod_revision: int = 0,
        count_only: bool = False,
        limit: int = 0,
    ) -> pb.RangeResponse:
        req = pb.RangeRequest(
            key=key,
            range_end=range_end,
            revision=revision,
            keys_only=keys_only,
            min_mod_revision=min_mod_revision,
            count_only=count_only,
            limit=limit,
        )
        try:
            return await self._unary("kv", "Range", req, idempotent=True)
        except Compacted:
            raise Compacted(revision, revision) from None

    async def get_prefix(self, prefix: bytes, *, revision: int = 0, keys_only: bool = False,
                         min_mod_revision: int = 0) -> pb.RangeResponse:
        """Every key under ``prefix``, read in pages of at most :data:`RANGE_PAGE` keys, all
        at one revision (the first page's, unless ``revision`` is given): one consistent
        cut, however large.  One reply may not exceed the channel's 64 MiB limit, which a
        single range over a quarter of a million exports does; a page that still does
        (large values) is read again in smaller pages."""
        end = prefix_end(prefix)
        if min_mod_revision:  # etcd filters after the limit: pages could not be followed
            return await self.range(prefix, end, revision=revision, keys_only=keys_only,
                                    min_mod_revision=min_mod_revision)
        key, page = prefix, RANGE_PAGE
        first: pb.RangeResponse | None = None
        kvs: list[Any] = []
        while True:
            try:
                resp = await self.range(key, end, revision=revision, keys_only=keys_only, limit=page)
            except _TooLarge:
                if page == 1:
                    raise
                page = max(1, page // 4)
                continue
            if first is None:
                first = resp
                revision = revision or resp.header.revision
            kvs.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return pb.RangeResponse(header=first.header, kvs=kvs, count=len(kvs))
            key = resp.kvs[-1].key + b"\0"

    async def get(self, key: bytes) -> pb.KeyValue | None:  # type: ignore[name-defined]
        resp = await self.range(key)
        return resp.kvs[0] if resp.kvs else None

    async def txn(
        self,
        compare: Sequence[pb.Compare] = (),
        success: Sequence[pb.RequestOp] = (),
        failure: Sequence[pb.RequestOp] = (),
    ) -> pb.TxnResponse:
        req = pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._unary("kv", "Txn", req, idempotent=False)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> pb.PutResponse:
        return await self._unary("kv", "Put", pb.PutRequest(key=key, value=value, lease=lease), idempotent=False)

    async def compact(self, revision: int, physical: bool = True) -> None:
        await self._unary("kv", "Compact", pb.CompactionRequest(revision=revision, physical=physical), idempotent=False)

    # ------------------------------------------------------------------ ops for txn
    @staticmethod
    def op_put(key: bytes, value: bytes, lease: int = 0) -> pb.RequestOp:
        return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def op_delete(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
        return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))

    @staticmethod
    def op_get(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
        return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=range_end))

    @staticmethod
    def cmp_mod(key: bytes, mod_revision: int) -> pb.Compare:
        return pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=mod_revision)

    @staticmethod
    def cmp_unchanged_since(key: bytes, range_end: bytes, revision: int) -> pb.Compare:
        """No key in [key, range_end) was created or modified after ``revision``."""
        return pb.Compare(key=key, range_end=range_end, target=pb.Compare.MOD, result=pb.Compare.LESS,
                          mod_revision=revision + 1)

    @staticmethod
    def cmp_exists(key: bytes) -> pb.Compare:
        return pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.GREATER, version=0)

    @staticmethod
    def cmp_missing(key: bytes) -> pb.Compare:
        return pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)

    # ------------------------------------------------------------------ leases
    async def grant(self, ttl: int) -> tuple[int, int]:
        # Not retried after a lost reply: a second grant would leave the first lease to expire
        # unused, which is harmless, but a caller that needs exactly one lease can't tell.
        r = await self._unary("lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=ttl), idempotent=False)
        return r.ID, r.TTL

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease once; return its new TTL, 0 if it no longer exists."""

        async def once(timeout: float) -> int:
            call = self.lease.LeaseKeepAlive(
                iter([pb.LeaseKeepAliveRequest(ID=lease_id)]), timeout=timeout, metadata=_REQUIRE_LEADER,
                wait_for_ready=True,
            )
            async for reply in call:
                return int(reply.TTL) if reply.TTL > 0 else 0
            return 0

        return await self._call(once, idempotent=True)

    async def time_to_live(self, lease_id: int) -> tuple[int, int]:
        """(granted TTL, seconds remaining) of a lease; (0, -1) when it is gone."""
        r = await self._unary("lease", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease_id), idempotent=True)
        if r.TTL < 0:
            return 0, -1
        return int(r.grantedTTL), int(r.TTL)

    async def revoke(self, lease_id: int) -> None:

        async def once(timeout: float) -> None:
            try:
                await self.lease.LeaseRevoke(
                    pb.LeaseRevokeRequest(ID=lease_id), timeout=timeout, metadata=_REQUIRE_LEADER, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # gone already (perhaps by our first try)
                    raise

        await self._call(once, idempotent=True)

    # ------------------------------------------------------------------ watch
    async def current_revision(self) -> int:
        """etcd's current revision (a linearizable read of one missing key)."""
        return (await self.range(b"\0", count_only=True)).header.revision

    async def watch(
        self,
        prefix: bytes,
        start_revision: int,
        requests: asyncio.Queue[pb.WatchRequest | None] | None = None,
    ) -> AsyncIterator[pb.WatchResponse]:
        """Yield raw watch responses for ``prefix`` from ``start_revision`` on.

        Raises :class:`Compacted` when etcd compacted past ``start_revision`` and
        :class:`StoreUnavailable` when the stream breaks (callers re-list or resume).
        Progress notifications (responses without events) are yielded too: their header
        revision tells the caller the store has nothing newer for the prefix.
        """
        queue: asyncio.Queue[pb.WatchRequest | None] = requests if requests is not None else asyncio.Queue()
        while not queue.empty():  # drop requests meant for a previous stream
            queue.get_nowait()
        await queue.put(
            pb.WatchRequest(
                create_request=pb.WatchCreateRequest(
                    key=prefix,
                    range_end=prefix_end(prefix),
                    start_revision=start_revision,
                    progress_notify=True,
                )
            )
        )

        async def requests() -> AsyncIterator[pb.WatchRequest]:
            while (item := await queue.get()) is not None:
                yield item

        # Require-leader: a member that loses its leader cancels the watch (then resumed on
        # another member) rather than going quiet while the others move on.
        call = self.watch_stub.Watch(requests(), metadata=_REQUIRE_LEADER)
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(start_revision, resp.compact_revision)
                if resp.canceled:
                    raise StoreUnavailable(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
                if resp.created and not resp.events:
                    continue
                yield resp
            raise StoreUnavailable("etcd watch stream ended")
        except grpc.aio.AioRpcError as exc:
            err = _convert(exc)
            if isinstance(err, StoreUnavailable):
                await self.reresolve()
            raise err from None
        finally:
            await queue.put(None)
            call.cancel()
