import os
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh inputs per test, reproducible run to run: the seed comes from the test's id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_configure(config):
    # under pytest-xdist (`make test` runs one worker per core), each worker gets its share of the
    # cores for torch's intra-op pool, so that the workers do not oversubscribe the machine
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
