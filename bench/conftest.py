import pytest
import torch

from jmp_ext.cpu import keep_freed_memory


def pytest_addoption(parser):
    parser.addoption(
        "--default-malloc", action="store_true",
        help="keep glibc's default allocator settings (what a script that does not call "
             "jmp_ext.cpu.keep_freed_memory gets): large buffers are page-faulted in afresh",
    )  # fmt: skip


def pytest_configure(config):
    # As the trainer does on the CPU: without it every large tensor is page-faulted in afresh.
    if not config.getoption("--default-malloc"):
        keep_freed_memory()


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    """Run a benchmark with 1 and with 2 torch threads (the CPU kernels follow torch's count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
