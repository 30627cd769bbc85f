"""What one apply reads (issue 17: a change costs what it changes).  Checking a batch
needs the exports of the names the batch routes to, never every export the federation
holds: at 50,000 services, reading and validating them all made one policy change take
seconds before any gateway saw it.  Real etcd; the Store in process, so that its reads
can be counted at the etcd client."""

from __future__ import annotations

import asyncio
from typing import Any

from federation import models
from federation.documents import check_batch, parse_document
from federation.server._etcd import Etcd
from federation.server._store import Store, Stored, dump


def _cluster(name: str) -> models.ClusterRecord:
    return models.ClusterRecord(name=name, trust_domain=f"{name}.isthmus.local")


def _export(cluster: str, ns: str, name: str) -> models.ExportedService:
    return models.ExportedService(cluster=cluster, namespace=ns, name=name, ports=(models.ServicePort(port=80),))


def _docs(*raw: dict[str, Any]) -> list[Any]:
    return [parse_document(d) for d in raw]


def _apply(etcd_endpoint: str, docs: list[Any], n_services: int) -> tuple[list[str], list[bytes], Stored]:
    seen: list[Stored] = []

    def check(stored: Stored) -> list[str]:
        seen.append(stored)
        return check_batch(docs, clusters=stored.clusters, services=stored.services, stored_routes=stored.routes)

    async def main() -> tuple[list[str], list[bytes]]:
        async with Etcd(etcd_endpoint) as e:
            store = Store(e)
            for c in ("east", "west", "central"):
                await e.put(store.keys.cluster(c), dump(_cluster(c)))
            for c in ("east", "west"):
                await e.put(store.keys.export(c, "shop", "cart"), dump(_export(c, "shop", "cart")))
            await e.put(store.keys.export("west", "shop", "cart-v2"), dump(_export("west", "shop", "cart-v2")))
            for j in range(n_services):  # the rest of the federation, named by no document
                await e.put(store.keys.export("central", f"ns{j % 7}", f"svc-{j}"),
                            dump(_export("central", f"ns{j % 7}", f"svc-{j}")))
            await e.put(store.keys.export("central", "shop", "broken"), b"{not json")
            ranges: list[bytes] = []
            real = e.range

            async def counted(key: bytes, range_end: bytes = b"", **kw: Any) -> Any:
                ranges.append(key if not range_end else key + b"*")
                return await real(key, range_end, **kw)

            e.range = counted  # type: ignore[method-assign]
            _, _, warnings = await store.apply_documents(docs, check)
            exports = store.keys.family("exports/")
            return warnings, [k for k in ranges if k.startswith(exports)]

    warnings, export_reads = asyncio.run(main())
    return warnings, export_reads, seen[-1]


def test_a_policy_apply_reads_no_export_record(etcd) -> None:  # type: ignore[no-untyped-def]
    docs = _docs({"kind": "AuthorizationPolicy", "name": "cart", "selector": {"namespace": "shop", "service": "cart"},
                  "rules": [{"from": [{"clusters": ["east"]}]}]})
    warnings, export_reads, stored = _apply(etcd.endpoint, docs, 300)
    assert warnings == []
    assert export_reads == [] and stored.services == ()
    assert sorted(c.name for c in stored.clusters) == ["central", "east", "west"]  # clusters are still checked


def test_a_route_apply_reads_only_the_exports_it_names_and_warns_as_before(etcd) -> None:  # type: ignore[no-untyped-def]
    docs = _docs({"kind": "TrafficRoute", "name": "cart", "host": {"namespace": "shop", "service": "cart"},
                  "rules": [{"destinations": [{"cluster": "east", "weight": 80}, {"cluster": "central", "weight": 10},
                                              {"cluster": "west", "service": "cart-v3", "weight": 10}],
                             "failover": ["*"]}]},
                 {"kind": "TrafficPolicy", "name": "broken", "host": {"namespace": "shop", "service": "broken"}})
    warnings, export_reads, stored = _apply(etcd.endpoint, docs, 300)
    # No range over the family: one point read per joined cluster and named service.
    assert all(not k.endswith(b"*") for k in export_reads), export_reads
    assert len(export_reads) == 3 * 3  # clusters x {cart, cart-v3, broken}
    assert sorted((s.cluster, s.name) for s in stored.services) == [("east", "cart"), ("west", "cart")]
    assert warnings == [
        "document 0: rules[0].destinations[1]: cluster 'central' does not export shop/cart (exported by east, west); "
        "this destination is unavailable until it does",
        "document 0: rules[0].destinations[2]: no cluster exports shop/cart-v3 yet; this destination is unavailable "
        "until one does",
        # The malformed record is skipped (and counted), as everywhere: it exports nothing.
        "document 1: host: no cluster exports shop/broken yet; the policy applies once one does",
    ]
