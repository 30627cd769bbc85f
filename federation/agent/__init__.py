"""The Isthmus Kubernetes agent (``isthmus agent run``, one per cluster).

It exports annotated Services (or ones with an MCS ``ServiceExport``) to the federation
and keeps mirror Services for what other clusters export here.  Pure converters in
``_convert``, names in ``_names``, the reconcile loop in ``_agent``, the Kubernetes
shell in ``_kube``; manifests for ``join-cluster`` in ``_manifests``.
"""

from ._convert import ExportPlan as ExportPlan
from ._convert import MirrorPlan as MirrorPlan
from ._convert import ObjectRef as ObjectRef
from ._convert import desired_exports as desired_exports
from ._convert import export_status as export_status
from ._convert import gateway_endpoints as gateway_endpoints
from ._convert import plan_mirrors as plan_mirrors
from ._convert import port_protocol as port_protocol
