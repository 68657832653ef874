import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("runtime, driver, fine", [(13000, 12080, False), (12080, 12020, True),
                                                  (12040, 13000, True), (13000, 13000, True)])
def test_a_driver_older_than_the_static_cuda_runtime_is_named(runtime, driver, fine):
    """The kernels carry the CUDA runtime of the toolkit that built them: a CUDA 13 build on a
    CUDA 12 driver (torch itself working) would fail at its first launch. Minor versions of one
    major version are compatible."""
    problem = _lib._driver_problem(runtime, driver)
    if fine:
        assert problem is None
    else:
        assert "built with CUDA 13.0, which needs an NVIDIA driver for CUDA 13.x or newer" in problem
        assert "driver supports CUDA 12.8" in problem and "rebuild jmp_ext with a CUDA 12.x toolkit" in problem


def test_compile_caches_are_keyed_on_the_ops_source(tmp_path):
    assert f"jmp_ext-{_lib.source_digest()[:16]}" in torch.compiler.config.cache_key_tag.split(";")
    copy = tmp_path / "ops"
    shutil.copytree(Path(_lib.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _lib.source_digest(copy) == _lib.source_digest()
    changed = copy / "reductions.py"
    changed.write_text(changed.read_text().replace("return _gather(grad, index)", "return 2 * _gather(grad, index)"))
    assert _lib.source_digest(copy) != _lib.source_digest()


def test_compile_cache_tag_keeps_the_users(monkeypatch):
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine")
    _lib.tag_compile_caches()
    _lib.tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine;jmp_ext-{_lib.source_digest()[:16]}"


GRADIENT = """
import json, sys, torch
import jmp_ext.ops as ops
assert ops.__file__.startswith(sys.argv[1]), ops.__file__
x = torch.linspace(0, 1, 6, dtype=torch.float64).reshape(6, 1).requires_grad_()
index = torch.tensor([0, 1, 0, 2, 1, 0])
loss = torch.compile(lambda x: (ops.scatter_sum(x.sin(), index, 3) ** 2).sum())
loss(x).backward()
print(json.dumps(x.grad.flatten().tolist()))
"""


@pytest.mark.slow
def test_compiled_backward_follows_an_upgrade(tmp_path):
    """An upgrade that changes only a backward formula is not served the old compiled backward
    from Inductor's disk cache (it was, before the cache key carried the source digest)."""
    package = Path(jmp_ext.__file__).parent
    root = tmp_path / "site"
    shutil.copytree(package, root / "jmp_ext", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(root), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def gradient():
        run = subprocess.run([sys.executable, "-c", GRADIENT, str(root)], env=env, capture_output=True,
                             text=True, check=True)
        return torch.tensor(json.loads(run.stdout.splitlines()[-1]), dtype=torch.float64)

    before = gradient()
    x = torch.linspace(0, 1, 6, dtype=torch.float64).reshape(6, 1).requires_grad_()
    index = torch.tensor([0, 1, 0, 2, 1, 0])
    (torch.zeros(3, 1, dtype=torch.float64).index_add(0, index, x.sin()) ** 2).sum().backward()
    torch.testing.assert_close(before, x.grad.flatten())
    # "Upgrade": the scatter's backward now doubles its gradient.
    changed = root / "jmp_ext" / "ops" / "reductions.py"
    source = changed.read_text()
    assert source.count("return _gather(grad, index)") == 1
    changed.write_text(source.replace("return _gather(grad, index)", "return 2 * _gather(grad, index)"))
    torch.testing.assert_close(gradient(), 2 * before)


def test_the_bindings_refuse_an_unknown_dtype_code():
    """python/jmp_ext/ops passes 0 (float32) or 1 (float64); dispatch_float reads any other code
    as float32, so the bindings check it (a guard for their one float_dtype check)."""
    from jmp_ext import _C

    where = _C.Where(cuda=False, num_threads=1, status=0, stream=0)
    with pytest.raises(ValueError, match="gaussian_basis: unknown dtype code 2"):
        _C.gaussian_basis(0, 0, 0, 0, 0, 0, 4, 2, where)
    with pytest.raises(ValueError, match="radius_graph: unknown dtype code 5"):
        _C.RadiusGraphCpu(0, 5, 0, 0, 0, 0, 0, 1.0, 0, 0.0, 0, False, 1)
