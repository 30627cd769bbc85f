from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    CLUSTER: _ClassVar[Kind]
    SERVICE: _ClassVar[Kind]
    POLICY: _ClassVar[Kind]
    BUNDLE: _ClassVar[Kind]
    CRL: _ClassVar[Kind]
    TRAFFIC: _ClassVar[Kind]
    LIVENESS: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
CLUSTER: Kind
SERVICE: Kind
POLICY: Kind
BUNDLE: Kind
CRL: Kind
TRAFFIC: Kind
LIVENESS: Kind

class JoinRequest(_message.Message):
    __slots__ = ("token", "name", "csr_pem", "gateway_addresses", "labels", "validity")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    csr_pem: bytes
    gateway_addresses: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    validity: str
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., gateway_addresses: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., validity: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("ca_cert_pem", "bundle_pem", "crl_pem", "trust_domain", "federation_trust_domain", "cluster_json", "revision")
    CA_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ca_cert_pem: bytes
    bundle_pem: bytes
    crl_pem: bytes
    trust_domain: str
    federation_trust_domain: str
    cluster_json: str
    revision: int
    def __init__(self, ca_cert_pem: _Optional[bytes] = ..., bundle_pem: _Optional[bytes] = ..., crl_pem: _Optional[bytes] = ..., trust_domain: _Optional[str] = ..., federation_trust_domain: _Optional[str] = ..., cluster_json: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("ttl_seconds", "cluster")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    cluster: str
    def __init__(self, ttl_seconds: _Optional[int] = ..., cluster: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "ca_pin", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CA_PIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    ca_pin: str
    expires_at: float
    def __init__(self, token: _Optional[str] = ..., ca_pin: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class PublishExportsRequest(_message.Message):
    __slots__ = ("cluster", "services_json", "ttl_seconds")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVICES_JSON_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    services_json: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, cluster: _Optional[str] = ..., services_json: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PublishExportsResponse(_message.Message):
    __slots__ = ("revision", "lease_id", "ttl_seconds", "changed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    lease_id: int
    ttl_seconds: int
    changed: int
    def __init__(self, revision: _Optional[int] = ..., lease_id: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., changed: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("ttl_seconds",)
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    def __init__(self, ttl_seconds: _Optional[int] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("cluster", "namespace", "name")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    namespace: str
    name: str
    def __init__(self, cluster: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class WithdrawResponse(_message.Message):
    __slots__ = ("revision", "deleted")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deleted: int
    def __init__(self, revision: _Optional[int] = ..., deleted: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("from_revision", "progress_interval")
    FROM_REVISION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    from_revision: int
    progress_interval: float
    def __init__(self, from_revision: _Optional[int] = ..., progress_interval: _Optional[float] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("kind", "key", "deleted", "json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    kind: Kind
    key: str
    deleted: bool
    json: str
    def __init__(self, kind: _Optional[_Union[Kind, str]] = ..., key: _Optional[str] = ..., deleted: _Optional[bool] = ..., json: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("revision", "snapshot_json", "changes", "is_snapshot", "progress")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_JSON_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    IS_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot_json: str
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    is_snapshot: bool
    progress: bool
    def __init__(self, revision: _Optional[int] = ..., snapshot_json: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ..., is_snapshot: _Optional[bool] = ..., progress: _Optional[bool] = ...) -> None: ...

class ReportAppliedRequest(_message.Message):
    __slots__ = ("gateway_id", "revision", "rejected_revision", "rejected_reason", "confirmed_at")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_AT_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    revision: int
    rejected_revision: int
    rejected_reason: str
    confirmed_at: float
    def __init__(self, gateway_id: _Optional[str] = ..., revision: _Optional[int] = ..., rejected_revision: _Optional[int] = ..., rejected_reason: _Optional[str] = ..., confirmed_at: _Optional[float] = ...) -> None: ...

class ReportAppliedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportTrafficRequest(_message.Message):
    __slots__ = ("gateway_id", "summary_json")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    summary_json: str
    def __init__(self, gateway_id: _Optional[str] = ..., summary_json: _Optional[str] = ...) -> None: ...

class ReportTrafficResponse(_message.Message):
    __slots__ = ("ttl_seconds", "edges")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    edges: int
    def __init__(self, ttl_seconds: _Optional[int] = ..., edges: _Optional[int] = ...) -> None: ...

class GetTrafficRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrafficResponse(_message.Message):
    __slots__ = ("traffic_json",)
    TRAFFIC_JSON_FIELD_NUMBER: _ClassVar[int]
    traffic_json: str
    def __init__(self, traffic_json: _Optional[str] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("policy_json", "policies_json")
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICIES_JSON_FIELD_NUMBER: _ClassVar[int]
    policy_json: str
    policies_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, policy_json: _Optional[str] = ..., policies_json: _Optional[_Iterable[str]] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("revision", "changed", "changed_each", "warnings", "created_each")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_EACH_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_EACH_FIELD_NUMBER: _ClassVar[int]
    revision: int
    changed: bool
    changed_each: _containers.RepeatedScalarFieldContainer[bool]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    created_each: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, revision: _Optional[int] = ..., changed: _Optional[bool] = ..., changed_each: _Optional[_Iterable[bool]] = ..., warnings: _Optional[_Iterable[str]] = ..., created_each: _Optional[_Iterable[bool]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies_json", "revision")
    POLICIES_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    policies_json: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, policies_json: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class DeletePolicyRequest(_message.Message):
    __slots__ = ("name", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class DeletePolicyResponse(_message.Message):
    __slots__ = ("revision", "deleted")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    deleted: int
    def __init__(self, revision: _Optional[int] = ..., deleted: _Optional[int] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents_json", "revision")
    DOCUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    documents_json: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, documents_json: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class RouteWeight(_message.Message):
    __slots__ = ("cluster", "service", "weight")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    service: str
    weight: int
    def __init__(self, cluster: _Optional[str] = ..., service: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class SetRouteWeightsRequest(_message.Message):
    __slots__ = ("name", "rule", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rule: int
    weights: _containers.RepeatedCompositeFieldContainer[RouteWeight]
    def __init__(self, name: _Optional[str] = ..., rule: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[RouteWeight, _Mapping]]] = ...) -> None: ...

class SetRouteWeightsResponse(_message.Message):
    __slots__ = ("revision", "route_json", "rule")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_JSON_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    route_json: str
    rule: int
    def __init__(self, revision: _Optional[int] = ..., route_json: _Optional[str] = ..., rule: _Optional[int] = ...) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters_json", "revision", "liveness")
    CLUSTERS_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    clusters_json: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    liveness: _containers.RepeatedCompositeFieldContainer[ClusterLiveness]
    def __init__(self, clusters_json: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ..., liveness: _Optional[_Iterable[_Union[ClusterLiveness, _Mapping]]] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services_json", "revision")
    SERVICES_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    services_json: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, services_json: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class GatewayStatus(_message.Message):
    __slots__ = ("cluster", "gateway_id", "applied_revision", "reported_at", "synced", "enforces_policy", "rejected_revision", "rejected_reason", "confirmed_at", "routes_applied", "no_report")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    ENFORCES_POLICY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_AT_FIELD_NUMBER: _ClassVar[int]
    ROUTES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    NO_REPORT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    gateway_id: str
    applied_revision: int
    reported_at: float
    synced: bool
    enforces_policy: bool
    rejected_revision: int
    rejected_reason: str
    confirmed_at: float
    routes_applied: bool
    no_report: bool
    def __init__(self, cluster: _Optional[str] = ..., gateway_id: _Optional[str] = ..., applied_revision: _Optional[int] = ..., reported_at: _Optional[float] = ..., synced: _Optional[bool] = ..., enforces_policy: _Optional[bool] = ..., rejected_revision: _Optional[int] = ..., rejected_reason: _Optional[str] = ..., confirmed_at: _Optional[float] = ..., routes_applied: _Optional[bool] = ..., no_report: _Optional[bool] = ...) -> None: ...

class ClusterLiveness(_message.Message):
    __slots__ = ("cluster", "exports", "lease_ttl", "lease_remaining", "last_heartbeat_age", "published_at", "state")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    exports: int
    lease_ttl: int
    lease_remaining: int
    last_heartbeat_age: float
    published_at: float
    state: str
    def __init__(self, cluster: _Optional[str] = ..., exports: _Optional[int] = ..., lease_ttl: _Optional[int] = ..., lease_remaining: _Optional[int] = ..., last_heartbeat_age: _Optional[float] = ..., published_at: _Optional[float] = ..., state: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("config_revision", "gateways", "clusters", "policy_revision", "liveness", "route_revision")
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_REVISION_FIELD_NUMBER: _ClassVar[int]
    config_revision: int
    gateways: _containers.RepeatedCompositeFieldContainer[GatewayStatus]
    clusters: _containers.RepeatedScalarFieldContainer[str]
    policy_revision: int
    liveness: _containers.RepeatedCompositeFieldContainer[ClusterLiveness]
    route_revision: int
    def __init__(self, config_revision: _Optional[int] = ..., gateways: _Optional[_Iterable[_Union[GatewayStatus, _Mapping]]] = ..., clusters: _Optional[_Iterable[str]] = ..., policy_revision: _Optional[int] = ..., liveness: _Optional[_Iterable[_Union[ClusterLiveness, _Mapping]]] = ..., route_revision: _Optional[int] = ...) -> None: ...

class RevokeClusterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeClusterResponse(_message.Message):
    __slots__ = ("revision", "serials", "withdrawn")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SERIALS_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    revision: int
    serials: _containers.RepeatedScalarFieldContainer[str]
    withdrawn: int
    def __init__(self, revision: _Optional[int] = ..., serials: _Optional[_Iterable[str]] = ..., withdrawn: _Optional[int] = ...) -> None: ...
