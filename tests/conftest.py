import os

import pytest
import torch
from hypothesis import settings

from jmp_ext.ops import build_info

# CI runs are reproducible: hypothesis draws the same examples every time.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

CUDA_OK = build_info()["cuda"] and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a GPU and a CUDA build of jmp_ext")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """The model tests run many small ops; on a busy shared CPU, OpenMP threads waiting for each
    other make them 10x slower, so they run on one thread (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on every device: the CPU always, CUDA when available."""
    return torch.device(request.param)
