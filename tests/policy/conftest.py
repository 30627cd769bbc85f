"""Fixtures for the policy and JWT tests: a settable clock and signing keys."""

from __future__ import annotations

import pytest
from joserfc.jwk import ECKey, RSAKey

from ._helpers import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1"})


@pytest.fixture(scope="session")
def ec_key2() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-2"})


@pytest.fixture(scope="session")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
