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

The names of services, mirrors, ports and identities that other packages share (the
mirror naming scheme among them) are in :mod:`federation.names`.
"""

from __future__ import annotations

from federation.names import GATEWAY_SERVICE_ACCOUNT

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
# The gateway's Deployment, Service and ServiceAccount share one name: its identity's.
GATEWAY_SERVICE = GATEWAY_SERVICE_ACCOUNT
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # EndpointSlice -> Service
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"

MCS_GROUP = "multicluster.x-k8s.io"
MCS_VERSION = "v1alpha1"
MCS_PLURAL = "serviceexports"


def is_mirror(obj: dict) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return MIRRORED_FROM in labels and labels.get(MANAGED_BY) == AGENT
