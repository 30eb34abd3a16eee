"""Fixtures every test folder may use; none of them starts a process. The
folders whose tests need Redis and the real servers import those fixtures in
their own conftest (see tests/support/fixtures.py), so that tests/domain runs
without Redis."""

from __future__ import annotations

import pytest
from lcic_guard.domain.policy import PolicyConfig

from tests.support.clock import FakeClock
from tests.support.events import Events
from tests.support.pki import Pki, make_pki


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy() -> PolicyConfig:
    return PolicyConfig()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One set of certificates for every TLS test."""
    return make_pki(tmp_path_factory.mktemp("pki"))
