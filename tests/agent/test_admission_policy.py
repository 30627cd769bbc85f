"""The agent's ValidatingAdmissionPolicy, evaluated with a real CEL implementation.

A wrong expression would deny every write the agent makes (failurePolicy: Fail), and no
API server runs here, so the CEL is evaluated with the `common-expression-language`
package (Python bindings of a CEL interpreter) the way the API server binds it:
``request``, ``object``, ``oldObject`` and ``variables``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from federation.agent import manifests as m
from federation.agent import _names as n

cel = pytest.importorskip("cel", reason="pip install common-expression-language to evaluate the admission policy")

POLICY = next(o for o in m.agent_objects() if o["kind"] == "ValidatingAdmissionPolicy")["spec"]
AGENT = m.AGENT_USER
MINE = {n.MIRRORED_FROM: "west", n.MANAGED_BY: n.AGENT}


def admit(operation: str, resource: str, obj: dict[str, Any] | None, old: dict[str, Any] | None, user: str = AGENT) -> bool | None:
    """True/False: allowed/denied; None: the policy does not apply (match condition false)."""
    request = {"operation": operation, "resource": {"group": "", "version": "v1", "resource": resource}, "userInfo": {"username": user}}
    ctx: dict[str, Any] = {"request": request, "object": obj, "oldObject": old}
    if not all(cel.evaluate(c["expression"], ctx) for c in POLICY["matchConditions"]):
        return None
    ctx["variables"] = {v["name"]: cel.evaluate(v["expression"], ctx) for v in POLICY["variables"]}
    return all(cel.evaluate(v["expression"], ctx) for v in POLICY["validations"])


def svc(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, port: int = 80) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "shop"}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"ports": [{"port": port}], "clusterIP": "10.0.0.1"}}


def with_(obj: dict[str, Any], **annotations: str | None) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    ann = out["metadata"].setdefault("annotations", {})
    for k, v in annotations.items():
        key = k.replace("_", "-").replace("isthmus-io-", "isthmus.io/")
        if v is None:
            ann.pop(key, None)
        else:
            ann[key] = v
    return out


USER = svc(labels={"app": "web"}, annotations={n.EXPORT: "true"})
STATUS = {"isthmus_io_export_status": "exported at revision 7"}

CASES = [
    pytest.param("CREATE", "services", svc(labels=MINE), None, True, id="create-mirror"),
    pytest.param("CREATE", "services", svc(labels={"app": "x"}), None, False, id="create-non-mirror"),
    pytest.param("CREATE", "services", svc(labels={n.MIRRORED_FROM: "west"}), None, False, id="create-without-managed-by"),
    pytest.param("UPDATE", "services", with_(USER, **STATUS), USER, True, id="add-status-annotation"),
    pytest.param("UPDATE", "services", USER, with_(USER, **STATUS), True, id="remove-status-annotation"),
    pytest.param("UPDATE", "services", with_(USER, isthmus_io_export_status="refused: x"), with_(USER, **STATUS), True, id="change-status"),
    pytest.param("UPDATE", "services", with_(USER, other="1"), USER, False, id="add-other-annotation"),
    pytest.param("UPDATE", "services", with_(USER, isthmus_io_export=None), USER, False, id="remove-users-annotation"),
    pytest.param("UPDATE", "services", svc(labels={"app": "web"}, annotations={n.EXPORT: "true"}, port=81), USER, False, id="change-spec"),
    pytest.param("UPDATE", "services", svc(labels=MINE, annotations={n.EXPORT: "true"}), USER, False, id="adopt-users-service"),
    pytest.param("UPDATE", "services", svc(labels=MINE, port=81), svc(labels=MINE), True, id="update-mirror"),
    pytest.param("UPDATE", "services", svc(labels={"app": "x"}), svc(labels=MINE), False, id="release-mirror"),
    pytest.param("DELETE", "services", None, svc(labels=MINE), True, id="delete-mirror"),
    pytest.param("DELETE", "services", None, USER, False, id="delete-users-service"),
    pytest.param("UPDATE", "endpointslices", with_(USER, **STATUS), USER, False, id="status-only-is-for-services"),
]


@pytest.mark.parametrize(("op", "resource", "obj", "old", "allowed"), CASES)
def test_agent_writes(op: str, resource: str, obj: Any, old: Any, allowed: bool) -> None:
    assert admit(op, resource, obj, old) is allowed


def test_other_users_are_not_matched() -> None:
    assert admit("DELETE", "services", None, USER, user="system:serviceaccount:kube-system:foo") is None
