"""Loads the compiled core jmp_ext._C once and gives the op wrappers what they need from it.

The kernels take raw addresses, sizes and a CUDA stream; this module converts tensors to those
and raises clear errors when the extension is missing or was built without CUDA.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

try:
    from jmp_ext import _C
except ImportError as error:  # pragma: no cover - only on a broken install
    raise ImportError(
        "jmp_ext's compiled extension (jmp_ext._C) could not be loaded. Reinstall the package "
        "from its source directory with `pip install .`; for a development tree, build it with "
        "`cmake -S . -B build/dev && cmake --build build/dev` and put python/ on PYTHONPATH. "
        f"The import error was: {error}"
    ) from error


# The kernels' dtype codes (csrc/common/float_dtype.h: FloatDtype, the float32 / float64 ops;
# csrc/reductions/reductions.h: Dtype, which adds bfloat16). Each op checks its own dtypes first.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


def source_digest(folder: Path = Path(__file__).parent) -> str:
    """sha256 of the op wrappers' Python (folder/*.py, in name order), in hex."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def tag_compile_caches() -> None:
    """Add "jmp_ext-<digest of these ops' Python>" to torch.compile's cache keys.

    Inductor's on-disk caches (AOTAutograd's included) key a compiled graph on the traced forward
    graph, in which a custom op is one opaque call: the op's backward formula is not in the key.
    Seen with torch 2.13: after a change to a formula alone, a compiled model with a warm cache
    ran the old backward, silently. The tag keeps the compiled graphs of different jmp_ext
    versions apart; a tag the user set stays, with ours appended."""
    config = torch.compiler.config
    tag = f"jmp_ext-{source_digest()[:16]}"
    if tag not in config.cache_key_tag.split(";"):
        config.cache_key_tag = ";".join(filter(None, [config.cache_key_tag, tag]))


tag_compile_caches()


def build_info() -> dict:
    """What the extension was built with: {'version': str, 'cuda': bool, 'cuda_version': int|None,
    'cpu_bilinear_isa': 'avx2' | 'baseline'}."""
    return dict(_C.build_info())


def num_threads() -> int:
    """CPU kernels use torch's intra-op thread count, so torch.set_num_threads() controls them."""
    return torch.get_num_threads()


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as the dense buffers the kernels read; None (an absent optional input) stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def ptr(tensor: torch.Tensor | None) -> int:
    """Address of a contiguous tensor's first element (0 for None or an empty tensor)."""
    if tensor is None or tensor.numel() == 0:
        return 0
    assert tensor.is_contiguous(), "kernels take contiguous buffers"
    return tensor.data_ptr()


def float32_under_autocast(*ops: str) -> None:
    """Under torch.autocast (bf16 or fp16, on the CPU or CUDA) these ops get float32 inputs.

    Autocast leaves a Linear layer's output in bf16 next to float32 bases, distances and
    envelopes, and the kernels take one dtype per call (they accumulate in float32 anyway), so
    without this a bf16 training step stopped at the first bilinear op with a dtype error."""
    for op in ops:
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(op, device_type, torch.float32)


def index_arg(index: torch.Tensor | None) -> tuple[int, bool]:
    """(address, is_int32) of a row index, int64 or int32: the kernels' IndexArray
    (csrc/common/index_array.h). None is (0, False), "no index"."""
    return ptr(index), index is not None and index.dtype == torch.int32


_NO_ERROR = torch.iinfo(torch.int64).max  # jmp_ext::cuda::kNoError (csrc/common/cuda_helpers.h)


def launch(name: str, device: torch.device, *args, checks_indices: bool = True):
    """Returns _C.<name>(*args, where) for a kernel on `device`: where says the CPU with torch's
    thread count, or the current CUDA stream and, for kernels that check index values
    (checks_indices), a fresh status word in which they report bad ones (kept alive here until
    the call returns). The others get no status word: allocating one is a device fill per call."""
    if device.type == "cuda":
        stream = require_cuda(device)
        with torch.cuda.device(device):  # the kernels launch on the current GPU: make it the tensors'
            status = torch.full((1,), _NO_ERROR, dtype=torch.int64, device=device) if checks_indices else None
            return getattr(_C, name)(*args, _C.Where(cuda=True, num_threads=0, status=ptr(status), stream=stream))
    if device.type != "cpu":
        raise ValueError(f"jmp_ext's kernels run on CPU or CUDA tensors, got tensors on {device}")
    return getattr(_C, name)(*args, _C.Where(cuda=False, num_threads=num_threads(), status=0, stream=0))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: torch.OutOfMemoryError on a GPU, the CPU
    allocator's RuntimeError ("can't allocate memory") on the host."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def require_cuda(device: torch.device) -> int:
    """Check that CUDA kernels can run on `device`; return the address of its current stream."""
    problem = _cuda_problem()
    if problem:
        raise RuntimeError(problem)
    return torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _cuda_problem() -> str | None:
    """Why this build's CUDA kernels cannot run in this process, or None (once per process:
    every op launch asks)."""
    info = _C.build_info()
    if not info["cuda"]:
        return ("jmp_ext was built without CUDA kernels, so it cannot run this op on a GPU. Rebuild it "
                "on a machine with the CUDA toolkit: `JMP_EXT_CUDA=ON pip install --force-reinstall "
                "--no-deps .` (nvcc must be on PATH or CUDA_HOME set).")
    if not torch.cuda.is_available():
        return ("a CUDA tensor was given but torch reports no usable GPU (torch.cuda.is_available() "
                "is False); install a CUDA build of torch or move the inputs to the CPU.")
    return _driver_problem(info["cuda_version"], _C.cuda_driver_version())


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _driver_problem(runtime: int, driver: int) -> str | None:
    """Why the kernels cannot run with this driver, or None. jmp_ext links the CUDA runtime of
    the toolkit that built it statically, so it needs a driver of that major version or newer,
    whatever CUDA torch was built with (torch works, the first jmp_ext launch would not).
    runtime, driver: CUDA versions as 1000 major + 10 minor (12080 is 12.8)."""
    if driver // 1000 >= runtime // 1000:
        return None
    return (
        f"jmp_ext's CUDA kernels were built with CUDA {_cuda_version_text(runtime)}, which needs an NVIDIA "
        f"driver for CUDA {runtime // 1000}.x or newer, but this machine's driver supports CUDA "
        f"{_cuda_version_text(driver)}. Update the driver, or rebuild jmp_ext with a CUDA "
        f"{driver // 1000}.x toolkit (torch uses CUDA {torch.version.cuda}): `CUDACXX=/path/to/cuda-"
        f"{driver // 1000}.x/bin/nvcc pip install --force-reinstall --no-deps .`"
    )
