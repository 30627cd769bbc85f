"""The IO half of CUSTOM authorization: the gateway's ext_authz clients (trio shell).

The decisions and message handling are sans-IO in ``gateway/_extauthz.py`` (see its
theory of operation, which also says why grpcio's synchronous client, bridged with
``TrioToken.run_sync_soon``, is how a trio gateway makes gRPC calls without blocking).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
import trio

from federation.models import ExtAuthz, ExtensionProvider

from ._decision import RequestAttrs
from ._extauthz import (INCOMPLETE, MAX_BODY, BodySource, MalformedAnswer, RequestBody, Verdict, grpc_check_request, grpc_verdict,
                        http_check_request, http_verdict)

log = structlog.get_logger("isthmus.gateway")


async def _grpc_call(stub: Any, req: Any, timeout: float) -> Any:
    """``stub.Check`` without blocking trio (see the module docstring)."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the gateway stopped meanwhile
            pass

    fut = stub.Check.future(req, timeout=timeout)
    fut.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


class ExtAuthzClients:
    """The gateway's channels, HTTP clients and concurrency bounds, by provider (shared by
    every revision: a new config does not drop connections to an authorizer)."""

    def __init__(self, cluster: str, identity: str = "", counter: Any = None) -> None:
        self.cluster = cluster
        self.identity = identity
        self.counter = counter  # isthmus_ext_authz_total{provider,result}, if metrics are kept
        self._channels: dict[str, tuple[Any, Any]] = {}  # address -> (channel, stub)
        self._http: Any = None
        self._limiters: dict[str, trio.CapacityLimiter] = {}

    def _stub(self, address: str) -> Any:
        hit = self._channels.get(address)
        if hit is None:
            import grpc
            from envoy.service.auth.v3 import external_auth_pb2_grpc

            channel = grpc.insecure_channel(address)
            hit = self._channels[address] = (channel, external_auth_pb2_grpc.AuthorizationStub(channel))
        return hit[1]

    def _limiter(self, name: str, limit: int) -> trio.CapacityLimiter:
        lim = self._limiters.get(name)
        if lim is None:
            lim = self._limiters[name] = trio.CapacityLimiter(limit)
        elif lim.total_tokens != limit:
            lim.total_tokens = limit
        return lim

    def keep(self, providers: Iterable[ExtensionProvider]) -> None:
        """Close the channels no provider of the config in force uses any more."""
        used = {p.ext_authz.address_for(self.cluster) for p in providers if p.ext_authz_grpc is not None}
        for address in [a for a in self._channels if a not in used]:
            self._channels.pop(address)[0].close()

    def count(self, provider: str, result: str) -> None:
        if self.counter is not None:
            self.counter.labels(provider, result).inc()

    async def read_body(self, source: BodySource, limit: int, timeout: float) -> tuple[bytes, bool]:
        """The body ``source`` holds once it ended or passed ``limit`` bytes, or after
        ``timeout`` (a body that never ends), whichever comes first."""
        arrived = trio.Event()
        source.collect(limit, arrived.set)
        with trio.move_on_after(timeout):
            await arrived.wait()
        return source.body()

    async def _ask(self, provider: ExtensionProvider, address: str, a: RequestAttrs, timeout: float,
                   body: RequestBody | None) -> Verdict:
        if provider.ext_authz_grpc is not None:
            import grpc

            req = grpc_check_request(a, cluster=self.cluster, identity=self.identity, body=body)
            try:
                resp = await _grpc_call(self._stub(address), req, timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                result = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
                return Verdict(result, reason=f"Check failed: {code.name if code else 'unknown'}")
            return grpc_verdict(resp)
        cfg = provider.ext_authz_http
        assert cfg is not None
        if a.method == "CONNECT":
            return Verdict("error", reason="an HTTP authorizer cannot check a TCP tunnel; use ext_authz_grpc")
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        method, url, headers = http_check_request(cfg, address, a, identity=self.identity, body=body)
        try:
            async with self._http.stream(method, url, headers=headers, timeout=timeout,
                                         content=body.data if body is not None else None) as r:
                body = b""
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_BODY:
                        break
                return http_verdict(cfg, r.status_code, r.headers.raw, body)
        except httpx.TimeoutException:
            return Verdict("timeout", reason="the HTTP authorizer did not answer in time")
        except httpx.HTTPError as exc:
            return Verdict("error", reason=f"HTTP authorizer: {type(exc).__name__}")

    async def check(self, name: str, provider: ExtensionProvider | None, a: RequestAttrs,
                    body: RequestBody | str | None = None) -> Verdict:
        """Ask ``provider`` about ``a`` within its deadline; counted and logged."""
        if body == INCOMPLETE:
            verdict = Verdict("timeout", reason="the request body did not arrive within the timeout")
        elif provider is None:
            verdict = Verdict("error", reason=f"no ExtensionProvider {name!r} in the config in force")
        elif not (address := provider.ext_authz.address_for(self.cluster)):
            verdict = Verdict("error", reason=f"ExtensionProvider {name!r} has no address for cluster {self.cluster!r}")
        else:
            cfg: ExtAuthz = provider.ext_authz
            verdict = Verdict("timeout", reason=f"no answer within {cfg.timeout * 1000:g}ms")
            with trio.move_on_after(cfg.timeout):
                async with self._limiter(name, cfg.max_concurrency):
                    try:
                        verdict = await self._ask(provider, address, a, cfg.timeout,
                                                  body if isinstance(body, RequestBody) else None)
                    except MalformedAnswer as exc:
                        verdict = Verdict("error", reason=str(exc))
        self.count(name, verdict.result)
        if verdict.ignored:
            log.warning("ext_authz.protected_headers_ignored", provider=name,
                        headers=[h.decode("latin-1") for h in verdict.ignored[:8]])
        if verdict.result in ("error", "timeout"):
            log.warning("ext_authz.failed", provider=name, result=verdict.result, reason=verdict.reason)
        return verdict

    async def aclose(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._http is not None:
            client, self._http = self._http, None
            await client.aclose()


__all__ = ["ExtAuthzClients"]
