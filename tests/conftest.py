import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray's test cluster runs on 127.0.0.1 only when this is set before `ray` is first imported (img2dataset imports
# it): otherwise Ray moves the nodes to the machine's outward address and cannot reach them (tests/ray_cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server for the instance tests (tests/postgres_server.py); skips when none can be had."""
    from tests.postgres_server import PostgresUnavailable, running_server

    try:
        with running_server() as server:
            yield server
    except PostgresUnavailable as err:
        pytest.skip(str(err))
