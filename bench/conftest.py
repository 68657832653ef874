import pytest
import torch

from jmp_ext.cpu import keep_freed_memory


def pytest_configure(config):
    # As the trainer does on the CPU: without it every large tensor is page-faulted in afresh.
    keep_freed_memory()


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    """Run a benchmark with 1 and with 2 torch threads (the CPU kernels follow torch's count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
