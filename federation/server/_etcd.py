"""A small asyncio etcd v3 client over aetcd's generated gRPC stubs.

Why not aetcd's high-level ``Client`` alone: the federation needs range requests at a
past revision, ``keys_only``/``min_mod_revision`` filters, raw watch responses (their
header revision and per-revision grouping are what the watch API tags messages with)
and several endpoints.  aetcd ships the etcd protos as ``aetcd.rpc``; this module is a
thin typed shell over them that converts gRPC failures into :mod:`federation` errors at
one place.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import grpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as stubs

from .._errors import Compacted, FederationError, StoreUnavailable

DEFAULT_TIMEOUT = 5.0


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
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, int]] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme not in ("http", ""):
            raise FederationError(
                f"invalid etcd endpoint {raw!r}: only http:// endpoints are supported "
                "(run etcd on a private network or loopback)"
            )
        if not url.hostname or not url.port:
            raise FederationError(f"invalid etcd endpoint {raw!r}: expected HOST:PORT or http://HOST:PORT")
        out.append((url.hostname, url.port))
    if not out:
        raise FederationError("invalid etcd endpoints: none given")
    return out


def _target(endpoints: list[tuple[str, int]]) -> str:
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Several endpoints: gRPC's ipv4:/ipv6: resolvers take an address list and fail over
    # between them (pick_first); names are resolved once here.
    addrs: list[str] = []
    for host, port in endpoints:
        for fam, *_rest, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if fam == socket.AF_INET:
                addrs.append(f"{sa[0]}:{port}")
                break
        else:
            raise FederationError(f"invalid etcd endpoint {host}:{port}: no IPv4 address")
    return "ipv4:" + ",".join(addrs)


def _convert(exc: grpc.aio.AioRpcError) -> FederationError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return StoreUnavailable(f"etcd unavailable: {code.name}: {exc.details()}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (exc.details() or ""):
        return Compacted(0, 0)
    return FederationError(f"etcd error: {code.name}: {exc.details()}")


class Etcd:
    """Connection to an etcd cluster (one gRPC channel, several endpoints with failover)."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def connect(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            _target(self.endpoints),
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self.kv = stubs.KVStub(self._channel)
        self.lease = stubs.LeaseStub(self._channel)
        self.watch_stub = stubs.WatchStub(self._channel)
        self.maintenance = stubs.MaintenanceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Etcd:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
    ) -> pb.RangeResponse:
        req = pb.RangeRequest(
            key=key,
            range_end=range_end,
            revision=revision,
            keys_only=keys_only,
            min_mod_revision=min_mod_revision,
            count_only=count_only,
        )
        try:
            return await self.kv.Range(req, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            err = _convert(exc)
            if isinstance(err, Compacted):
                raise Compacted(revision, revision) from None
            raise err from None

    async def get_prefix(self, prefix: bytes, **kw: object) -> pb.RangeResponse:
        return await self.range(prefix, prefix_end(prefix), **kw)  # type: ignore[arg-type]

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
        try:
            return await self.kv.Txn(req, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> pb.PutResponse:
        try:
            return await self.kv.Put(pb.PutRequest(key=key, value=value, lease=lease), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None

    async def compact(self, revision: int, physical: bool = True) -> None:
        try:
            await self.kv.Compact(pb.CompactionRequest(revision=revision, physical=physical), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None

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
    def cmp_exists(key: bytes) -> pb.Compare:
        return pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.GREATER, version=0)

    @staticmethod
    def cmp_missing(key: bytes) -> pb.Compare:
        return pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)

    # ------------------------------------------------------------------ leases
    async def grant(self, ttl: int) -> tuple[int, int]:
        try:
            r = await self.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None
        return r.ID, r.TTL

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease once; return its new TTL, 0 if it no longer exists."""
        try:
            call = self.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout)
            async for reply in call:
                return int(reply.TTL) if reply.TTL > 0 else 0
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None
        return 0

    async def time_to_live(self, lease_id: int) -> tuple[int, int]:
        """(granted TTL, seconds remaining) of a lease; (0, -1) when it is gone."""
        try:
            r = await self.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _convert(exc) from None
        if r.TTL < 0:
            return 0, -1
        return int(r.grantedTTL), int(r.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise _convert(exc) from None

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

        call = self.watch_stub.Watch(requests())
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
            raise _convert(exc) from None
        finally:
            await queue.put(None)
            call.cancel()
