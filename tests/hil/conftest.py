"""Fixtures that boot the real guest under QEMU (TCG)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hil.run.session import Session


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    """One booted guest per test module (boot costs ~0.3 s); tests that need a fresh state
    call `session.reset()`."""
    s = Session()
    s.boot()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fresh(session: Session) -> Session:
    session.reset()
    return session


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/hil/" in str(item.fspath):
            item.add_marker(pytest.mark.hil)
