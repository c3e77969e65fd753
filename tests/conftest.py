import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh inputs per test, reproducible run to run: the seed comes from the test's id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
