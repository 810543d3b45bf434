from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ProcessGroup


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    """Real processes for one test; their logs are printed if the test failed."""
    group = ProcessGroup()
    yield group
    group.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(group.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
