"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mesh import Mesh, running_mesh


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """One real `sidemesh up` per test module; its logs are printed if a test of the module failed.

    With its dashboard only in a module that sets ``MESH_WITH_DASHBOARD = True``."""
    with running_mesh(dashboard=getattr(request.module, "MESH_WITH_DASHBOARD", False)) as m:
        yield m
        if any(getattr(item, "rep_call", None) and item.rep_call.failed for item in request.session.items
               if item.module is request.module):
            m.dump_logs()
