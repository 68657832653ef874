"""python -m jmp_ext: the install report and self-check a user runs first on a new machine."""

import subprocess
import sys

import torch

import jmp_ext.__main__ as self_check
import jmp_ext.ops as ops


def test_the_self_check_passes_and_reports_the_build(capsys):
    assert self_check.main() == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and f"extension: {ops.build_info()}" in out
    assert "cpu:\n  radius graph vs ASE's neighbour list: ok\n  GemNet-OC energy and gradient forces: ok\n" in out
    assert out.endswith("all checks passed\n")


def test_the_self_check_names_what_fails(monkeypatch, capsys):
    """Each check can fail: a graph with an edge missing, forces unlike the reference device's,
    an op that raises; the exit status is 1 and the report goes on."""
    radius_graph = ops.radius_graph

    def one_edge_short(*args, **kwargs):
        edge_index, cell_offsets, distance = radius_graph(*args, **kwargs)
        return edge_index[:, 1:], cell_offsets[1:], distance[1:]

    monkeypatch.setattr(ops, "radius_graph", one_edge_short)
    assert self_check.main() == 1
    out = capsys.readouterr().out
    assert "radius graph vs ASE's neighbour list: FAILED: 8423 edges, ASE finds 8424; (target, source, shift) " \
           "only ours: [], only ASE's: [(0, 2, (0, 0, 0))]\n" in out
    assert "GemNet-OC energy and gradient forces: ok" in out and out.endswith("some checks FAILED: please report "
                                                                             "them with this output\n")
    reference, problem = self_check.model_problem("cpu", None)
    assert problem is None
    reference["forces"][3, 1] += 1e-6 * reference["forces"].abs().max()
    assert self_check.model_problem("cpu", reference)[1] == "forces differ from the CPU's by 1e-06 (relative to " \
                                                            "its largest)"

    def broken(device, reference):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(self_check, "model_problem", broken)
    assert self_check.main() == 1
    assert "  ran: FAILED: RuntimeError: CUDA error: an illegal memory access was encountered\n" in \
        capsys.readouterr().out


def test_python_dash_m_runs_it():
    result = subprocess.run([sys.executable, "-m", "jmp_ext"], capture_output=True, text=True,
                            env={"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "all checks passed" in result.stdout, result.stderr


def test_gpus_it_cannot_use_fail_the_check(monkeypatch, capsys):
    """A CPU-only build, or a driver older than the kernels' CUDA, on a machine with GPUs: said,
    and exit 1 (it printed "all checks passed")."""
    import jmp_ext.ops._lib as lib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100")
    monkeypatch.setattr(ops, "build_info", lambda: {"version": "0.1.0", "cuda": True, "cuda_version": 13000})
    monkeypatch.setattr(lib, "_cuda_problem", lambda: "the driver supports CUDA 12.2, the kernels need 13.0")
    assert self_check.main() == 1
    out = capsys.readouterr().out
    assert "GPUs: cuda:0 NVIDIA H100\n  jmp_ext on these GPUs: FAILED: the driver supports CUDA 12.2" in out
    assert "cpu:\n  radius graph vs ASE's neighbour list: ok" in out and "cuda:0:" not in out
    # A CPU-only build (JMP_EXT_CUDA=OFF) there is a choice: said, and the CPU's checks decide.
    monkeypatch.setattr(ops, "build_info", lambda: {"version": "0.1.0", "cuda": False})
    monkeypatch.setattr(lib, "_cuda_problem", lambda: "jmp_ext was built without CUDA kernels")
    assert self_check.main() == 0
    assert "GPUs: cuda:0 NVIDIA H100\n  note: jmp_ext was built without CUDA kernels\n" in capsys.readouterr().out
