import pytest
import torch

import jmp_ext
from jmp_ext.ops import _lib, build_info


def test_build_info_reports_version_and_cuda():
    info = build_info()
    assert info["version"] == jmp_ext.__version__
    assert isinstance(info["cuda"], bool)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_request_without_gpu_raises_clear_error():
    with pytest.raises(RuntimeError, match="(built without CUDA|no usable GPU)"):
        _lib.require_cuda(torch.device("cuda"))
