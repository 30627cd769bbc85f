"""Names the agent reads and writes on Kubernetes objects (stable API).

Annotations and labels the agent *reads* on a user's Service:

* ``isthmus.io/export: "true"`` — export this Service (``"false"`` or absent: don't);
* ``isthmus.io/export-to: "west,central"`` — only to these clusters (absent: every other).

What it *writes*:

* on an exported Service, only the annotation ``isthmus.io/export-status``
  (``exported at revision N`` / ``refused: why``) and Events;
* mirror Services and their EndpointSlices, always labelled ``isthmus.io/mirrored-from``
  (the source cluster, or ``federation`` for the federated mirror) and
  ``app.kubernetes.io/managed-by: isthmus-agent``.  The agent never updates or deletes a
  Service or EndpointSlice without both labels: a user's object that happens to carry a
  mirror's name is reported as a conflict, never clobbered.

Mirror naming scheme, in the exported Service's own namespace (namespace sameness, as
in the MCS API):

* per source cluster: ``<name>--<cluster>`` (``web--west``), which the gateway routes to
  ``web.<ns>.west.isthmus.local``;
* federated, across every cluster exporting ``<ns>/<name>`` to us: ``<name>--isthmus``.

The ``--`` infix is what keeps mirrors apart from local Services: Kubernetes forbids no
name pattern, so ``--`` in a Service name is reserved for Isthmus by convention (and
enforced by the label check above).  A cluster named ``isthmus`` cannot exist
(:func:`mirror_name` refuses it) so the two forms never meet.  Names longer than 63
characters keep a prefix of the service name and end in 8 hex digits of a hash of the
full name, so they stay unique and stable.
"""

from __future__ import annotations

import hashlib

EXPORT = "isthmus.io/export"
EXPORT_TO = "isthmus.io/export-to"
EXPORT_STATUS = "isthmus.io/export-status"
MIRRORED_FROM = "isthmus.io/mirrored-from"
# The exported service's name and namespace as the source cluster knows them, and the
# name the local gateway's outbound listener routes (its :authority).
REMOTE_SERVICE = "isthmus.io/remote-service"
REMOTE_AUTHORITY = "isthmus.io/remote-authority"
MANAGED_BY = "app.kubernetes.io/managed-by"
AGENT = "isthmus-agent"
FEDERATED = "federation"  # MIRRORED_FROM value of the federated mirror
FEDERATED_SUFFIX = "isthmus"
SYSTEM_NAMESPACE = "isthmus-system"
GATEWAY_SERVICE = "isthmus-gateway"
GATEWAY_OUTBOUND_PORT = 15001
GATEWAY_INBOUND_PORT = 15443
GATEWAY_ADMIN_PORT = 15000
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # EndpointSlice -> Service
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
DNS_SUFFIX = "isthmus.local"

MCS_GROUP = "multicluster.x-k8s.io"
MCS_VERSION = "v1alpha1"
MCS_PLURAL = "serviceexports"

_MAX = 63


def mirror_name(name: str, cluster: str | None) -> str:
    """The mirror Service's name: ``<name>--<cluster>``, or ``<name>--isthmus`` when federated."""
    if cluster == FEDERATED_SUFFIX:
        raise ValueError(f"cluster name {cluster!r} is reserved for federated mirrors")
    suffix = FEDERATED_SUFFIX if cluster is None else cluster
    full = f"{name}--{suffix}"
    if len(full) <= _MAX:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = _MAX - len(digest) - 1
    return f"{full[:keep].rstrip('-')}-{digest}"


def remote_authority(name: str, namespace: str, cluster: str | None, dns_suffix: str = DNS_SUFFIX) -> str:
    """What the local gateway's outbound listener routes for this mirror (gateway/_routes.py)."""
    if cluster is None:
        return f"{name}.{namespace}.{dns_suffix}"
    return f"{name}.{namespace}.{cluster}.{dns_suffix}"


def is_mirror(obj: dict) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return MIRRORED_FROM in labels and labels.get(MANAGED_BY) == AGENT
