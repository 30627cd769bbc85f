"""Error root of the trust package.

Every message starts with a fixed prefix naming what was wrong (SPIRE style:
``invalid SPIFFE ID: ...``) and, where it helps, what to do about it.
"""

from __future__ import annotations


class TrustError(Exception):
    """Root of every error raised by :mod:`trust`."""


class InvalidSpiffeId(TrustError, ValueError):
    """A SPIFFE ID or trust domain does not follow the SPIFFE spec or our naming scheme."""


class InvalidName(TrustError, ValueError):
    """A cluster or admin name is not a lowercase RFC 1123 label."""


class BadFile(TrustError):
    """A PEM file is missing, malformed, or does not hold what it should."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InvalidCSR(TrustError):
    """A certificate signing request failed proof of possession or asks for foreign names."""


class InvalidValidity(TrustError, ValueError):
    """A duration such as ``90d`` could not be parsed."""


class PeerRejected(TrustError):
    """The peer of an mTLS connection failed our post-handshake checks."""
