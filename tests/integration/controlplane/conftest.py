"""The shared control plane for this package's tests (helpers in ``tests.integration.cp_support``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.cp_support import ControlPlane, running_control_plane


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane with the default policy, shared by a module's tests."""
    with running_control_plane(tmp_path_factory.mktemp("cp")) as cp:
        yield cp
