"""Fixtures for the sans-socket data-plane tests: a fresh ``VirtualLoop`` per test (see ``fakes.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.unit.dataplane.fakes import VirtualLoop


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    """An event loop on a virtual clock with fake outbound connections; closed after the test."""
    vloop = VirtualLoop()
    try:
        yield vloop
    finally:
        pending = [task for task in asyncio.all_tasks(vloop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            vloop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        vloop.close()
