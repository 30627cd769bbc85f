"""Error root of the federation package.

Messages start with a fixed prefix naming what failed and, where it helps, say what to
do.  Subclasses carry the gRPC status they map to, so the server converts them at one
boundary (``federation/server/_server.py``, ``_rpc``) and the client maps status codes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _Code:
    """A gRPC status code named now, resolved on first use: the gateway imports these
    errors (through federation.policy) and must not pay for importing grpc."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        import grpc

        return grpc.StatusCode[self.name]


class FederationError(Exception):
    """Root of every error raised by :mod:`federation`."""

    code: Any = _Code("INTERNAL")


class InvalidRequest(FederationError, ValueError):
    """The request is malformed (bad name, bad model JSON, ...)."""

    code = _Code("INVALID_ARGUMENT")


class _Problems:
    """What failed validation: ``what`` names the thing (``AuthorizationPolicy``, ``exported
    service``), ``problems`` holds ``(field path, message)`` pairs with paths such as
    ``rules[0].to[0].ports[0]``, and ``field`` is the first path."""

    LIMIT = 3  # problems named in the message; the rest are counted

    def __init__(self, what: str, problems: Sequence[tuple[str, str]]) -> None:
        self.what = what
        self.problems = tuple(problems)
        self.field = self.problems[0][0] if self.problems else ""
        super().__init__(f"invalid {what}: {self.describe()}")

    def describe(self) -> str:
        """``path: message; path: message (and 2 more)`` (the message without ``invalid <what>:``)."""
        parts = [f"{path}: {msg}" if path else msg for path, msg in self.problems[: self.LIMIT]]
        more = len(self.problems) - self.LIMIT
        return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class InvalidInput(_Problems, InvalidRequest):
    """What a user wrote (a CLI file, an API request) is not a valid model: refused, with
    the field path (:func:`federation.models.parse_input`)."""


class InvalidRecord(_Problems, FederationError, ValueError):
    """A value read from etcd or the wire is not a valid model: a bad record, which the
    reader skips (:func:`federation.models.read_record`)."""


class PermissionDenied(FederationError):
    """The caller is authenticated but may not do this."""

    code = _Code("PERMISSION_DENIED")


class Unauthenticated(FederationError):
    """The caller presented no usable identity (or an invalid/expired token)."""

    code = _Code("UNAUTHENTICATED")


class NotFound(FederationError):
    code = _Code("NOT_FOUND")


class AlreadyExists(FederationError):
    code = _Code("ALREADY_EXISTS")


class StoreUnavailable(FederationError):
    """etcd cannot be reached (or timed out); callers retry with backoff."""

    code = _Code("UNAVAILABLE")


class Compacted(FederationError):
    """A revision asked for has been compacted away in etcd."""

    code = _Code("OUT_OF_RANGE")

    def __init__(self, revision: int, compact_revision: int) -> None:
        self.revision = revision
        self.compact_revision = compact_revision
        super().__init__(
            f"revision compacted: {revision} is older than etcd's compaction point {compact_revision}"
        )


class PinMismatch(FederationError):
    """The federation server's chain does not lead to the root the join token was issued for."""

    code = _Code("UNAUTHENTICATED")


class RemoteError(FederationError):
    """A call to the federation service failed; ``code`` and ``details`` are the gRPC status."""

    def __init__(self, code: Any, details: str) -> None:  # a grpc.StatusCode
        self.code = code
        self.details = details
        super().__init__(f"federation call failed: {code.name}: {details}")


class UnreadableRecord(FederationError):
    """A record in etcd failed validation and the call that needs it cannot proceed
    without it (the record itself is :class:`InvalidRecord`, skipped where it can be)."""

    code = _Code("FAILED_PRECONDITION")


class InUse(FederationError):
    """A record other stored records still name cannot be deleted (an ExtensionProvider a
    CUSTOM AuthorizationPolicy names); the message names them."""

    code = _Code("FAILED_PRECONDITION")


class ResourceExhausted(FederationError):
    """A per-caller limit was reached (join concurrency, gateways per cluster, ...)."""

    code = _Code("RESOURCE_EXHAUSTED")
