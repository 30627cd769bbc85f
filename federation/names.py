"""The names every part of Isthmus agrees on: service names, the DNS suffix, ports, identities.

Stable API: workloads call these names, the agent writes them onto Kubernetes objects,
gateways route them and the federation service authorizes by them.  The gateway, the
agent, the server, the CLI and the demo import them from here; nothing else defines them.

Service names
-------------
* Inbound, at the exporting cluster's gateway, a service is named as its own cluster knows
  it: ``<svc>.<ns>.svc.cluster.local[:port]`` (:func:`local_host`).
* Outbound, at an importing cluster's gateway (:func:`outbound_host`, suffix
  :data:`DNS_SUFFIX` unless the gateway's ``dns_suffix`` says otherwise):

  - ``<svc>.<ns>.<cluster>.<suffix>[:port]``: the service as exported by one cluster;
  - ``<svc>.<ns>.<suffix>[:port]``: the federated name, spread over every cluster that
    exports ``<ns>/<svc>`` to us.

  The label count tells the two apart (3 vs 2 labels before the suffix), which is why
  namespaces and services are single DNS labels.
* The Kubernetes agent's mirror Services, in the exported Service's own namespace
  (namespace sameness, as in the MCS API): ``<svc>--<cluster>`` for one source cluster and
  ``<svc>--isthmus`` for the federated name (:func:`mirror_name`).  A workload calls them
  as ``<mirror>.<ns>[.svc[.cluster.local]][:port]`` (:func:`mirror_hosts`); their
  endpoints are the local gateway's outbound listener.  The ``--`` infix keeps mirrors
  apart from local Services; a cluster named ``isthmus`` cannot exist, so the two mirror
  forms never meet.  Names longer than 63 characters keep a prefix and end in 8 hex
  digits of a hash of the full name, so they stay unique and stable.

Without a port, a name means the service's only port; with several ports, port 80 if it
has one, else its first port.

Identities
----------
A cluster's gateway and agent run in :data:`SYSTEM_NAMESPACE` as the service accounts
:data:`GATEWAY_SERVICE_ACCOUNT` and :data:`AGENT_SERVICE_ACCOUNT`, so their SPIFFE IDs are
``spiffe://<cluster>.<federation-domain>`` + :data:`GATEWAY_PATH` / :data:`AGENT_PATH`.
Those three names are defined by :mod:`trust` (which mints the IDs) and re-exported here.

Gateway names
-------------
A gateway *process* reports what it applied as ``<cluster>/<instance>``
(:func:`gateway_name`), e.g. ``east/gw-7d9f-1``: the instance is its host name and pid
(:func:`gateway_instance`), lower case, a DNS label (at most 63 characters of a-z, 0-9
and '-').  So the name is the same in ``isthmus status``, in JSON and in the etcd key
``<prefix>status/<cluster>/<instance>``, and a restarted process is a new instance (the
old one goes STALE and disappears with its status lease).  :func:`parse_gateway_name`
is the federation's check of a reported name.
"""

from __future__ import annotations

import hashlib
import re

from trust import AGENT_SERVICE_ACCOUNT, GATEWAY_SERVICE_ACCOUNT, SYSTEM_NAMESPACE

__all__ = [
    "AGENT_PATH",
    "AGENT_SERVICE_ACCOUNT",
    "CLUSTER_IDENTITY_PATHS",
    "DNS_SUFFIX",
    "FEDERATED_SUFFIX",
    "GATEWAY_ADMIN_PORT",
    "GATEWAY_INBOUND_PORT",
    "GATEWAY_OUTBOUND_PORT",
    "GATEWAY_PATH",
    "GATEWAY_SERVICE_ACCOUNT",
    "LOCAL_SUFFIX",
    "SYSTEM_NAMESPACE",
    "gateway_instance",
    "gateway_name",
    "local_host",
    "mirror_hosts",
    "mirror_name",
    "outbound_host",
    "parse_gateway_name",
    "service_hosts",
    "split_authority",
]

DNS_SUFFIX = "isthmus.local"  # the default suffix of outbound names
LOCAL_SUFFIX = "svc.cluster.local"  # Kubernetes' own service names
FEDERATED_SUFFIX = "isthmus"  # the federated mirror: <svc>--isthmus

# The gateway's default listeners (Istio's sidecar ports: 15001 outbound, 15443 the
# east-west gateway's mTLS port, 15000 admin).
GATEWAY_OUTBOUND_PORT = 15001
GATEWAY_INBOUND_PORT = 15443
GATEWAY_ADMIN_PORT = 15000

GATEWAY_PATH = f"/ns/{SYSTEM_NAMESPACE}/sa/{GATEWAY_SERVICE_ACCOUNT}"
AGENT_PATH = f"/ns/{SYSTEM_NAMESPACE}/sa/{AGENT_SERVICE_ACCOUNT}"
# The SPIFFE ID paths that speak for a cluster (under its own trust domain).
CLUSTER_IDENTITY_PATHS = (GATEWAY_PATH, AGENT_PATH)

_MAX_LABEL = 63
_INSTANCE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def local_host(name: str, namespace: str) -> str:
    """The name the exporting cluster knows a service by: ``<name>.<ns>.svc.cluster.local``."""
    return f"{name}.{namespace}.{LOCAL_SUFFIX}"


def outbound_host(name: str, namespace: str, cluster: str | None = None, dns_suffix: str = DNS_SUFFIX) -> str:
    """What an importing cluster's gateway routes: one cluster's export, or the federated name."""
    if cluster is None:
        return f"{name}.{namespace}.{dns_suffix}"
    return f"{name}.{namespace}.{cluster}.{dns_suffix}"


def mirror_name(name: str, cluster: str | None) -> str:
    """The mirror Service's name: ``<name>--<cluster>``, or ``<name>--isthmus`` when federated."""
    if cluster == FEDERATED_SUFFIX:
        raise ValueError(f"cluster name {cluster!r} is reserved for federated mirrors")
    suffix = FEDERATED_SUFFIX if cluster is None else cluster
    full = f"{name}--{suffix}"
    if len(full) <= _MAX_LABEL:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = _MAX_LABEL - len(digest) - 1
    return f"{full[:keep].rstrip('-')}-{digest}"


def mirror_hosts(name: str, namespace: str, cluster: str | None) -> tuple[str, ...]:
    """The names a workload may use for the agent's mirror of ``namespace/name``."""
    try:
        m = mirror_name(name, cluster)
    except ValueError:  # a cluster named like the federated suffix has no mirror
        return ()
    return (local_host(m, namespace), f"{m}.{namespace}.svc", f"{m}.{namespace}")


def gateway_instance(host: str, pid: int | None = None) -> str:
    """A gateway process's instance name: ``<host>-<pid>`` as a DNS label (lower case, any
    other character and runs of them as '-'; the host is shortened to fit 63 characters).
    A valid instance name (and no pid) is returned unchanged."""
    suffix = f"-{pid}" if pid is not None else ""
    base = re.sub(r"[^a-z0-9-]+", "-", host.lower()).strip("-") or "gateway"
    return base[: _MAX_LABEL - len(suffix)].rstrip("-") + suffix


def gateway_name(cluster: str, instance: str) -> str:
    """``<cluster>/<instance>``: how a gateway process is named in status (see above)."""
    return f"{cluster}/{instance}"


def parse_gateway_name(text: str) -> tuple[str, str]:
    """``(cluster, instance)`` of a gateway name; ValueError saying what is wrong."""
    cluster, sep, instance = text.partition("/")
    if not sep or not _INSTANCE.match(cluster) or not _INSTANCE.match(instance):
        raise ValueError(
            f"gateway name {text[:80]!r} must be <cluster>/<instance>, each a DNS label "
            "(a-z, 0-9, '-', at most 63 characters), e.g. east/gw-1-4242"
        )
    return cluster, instance


def service_hosts(name: str, namespace: str, cluster: str | None, dns_suffix: str = DNS_SUFFIX) -> tuple[str, ...]:
    """Every name an importing cluster's gateway answers for ``namespace/name``: one
    cluster's export (``cluster`` given: a pin) or the federated name (``None``)."""
    return (outbound_host(name, namespace, cluster, dns_suffix), *mirror_hosts(name, namespace, cluster))


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` -> (lowercase host without a trailing dot, port or None)."""
    host, sep, port = authority.rpartition(":")
    # ASCII digits only: str.isdigit() also accepts "²" (which int() refuses) and "١٢"
    if not sep or not (port.isascii() and port.isdigit()):
        host, port = authority, ""
    host = host.lower().rstrip(".")
    return host, (int(port) if port else None)
