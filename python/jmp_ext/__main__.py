"""python -m jmp_ext: what this install is built with, and a self-check of it on every device.

Prints the versions (jmp_ext, torch, CUDA, ASE) and the extension's build, then checks on the
CPU and on each visible GPU: the radius graph of a rattled periodic copper cell against ASE's
neighbour list, and a small GemNet-OC's energy and gradient forces against the CPU's in
float64. Exits 0 when every check passes, 1 otherwise (each failure names what differs). The
first command to run on a new machine, and what a bug report should include.
"""

from __future__ import annotations

import platform
import sys


def _report(name: str, problem: str | None) -> bool:
    print(f"  {name}: {'ok' if problem is None else 'FAILED: ' + problem}")
    return problem is None


def radius_graph_problem(device: str) -> str | None:
    """How the radius graph of a rattled 3x3x3 fcc Cu cell (108 atoms, cutoff 6 Å) on `device`
    differs from ASE's neighbour list in float64 (pairs with their lattice shifts, distances to
    1e-9 Å), or None."""
    import torch
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    import jmp_ext.ops as ops

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=0)
    i, j, shift, d = neighbor_list("ijSd", atoms, 6.0)  # (i: the centre, our target)
    expected = dict(zip(zip(i.tolist(), j.tolist(), map(tuple, shift.tolist())), d.tolist()))
    edge_index, cell_offsets, distance = ops.radius_graph(torch.tensor(atoms.positions, device=device), 6.0,
                                                          cell=torch.tensor(atoms.cell.array, device=device))
    got = dict(zip(zip(edge_index[1].tolist(), edge_index[0].tolist(), map(tuple, cell_offsets.tolist())),
                   distance.tolist()))
    if got.keys() != expected.keys():
        return (f"{len(got)} edges, ASE finds {len(expected)}; (target, source, shift) only ours: "
                f"{sorted(got.keys() - expected.keys())[:3]}, only ASE's: {sorted(expected.keys() - got.keys())[:3]}")
    error = max(abs(got[pair] - expected[pair]) for pair in got)
    return f"distances differ by up to {error:.3g} Å" if error > 1e-9 else None


def model_problem(device: str, reference: dict | None) -> tuple[dict, str | None]:
    """A tiny GemNet-OC (gradient forces, random weights, seed 0) on ethanol and a Cu cell in
    float64 on `device`: (its energies and forces, on the CPU; how they differ from
    `reference`'s beyond 1e-9 relative, or are not finite, or None)."""
    import torch
    from ase.build import bulk, molecule

    from jmp_ext.data import atoms_to_entry, collate
    from jmp_ext.graphs import GraphConfig, build_graphs
    from jmp_ext.models import BackboneConfig, FinetuneModel, HeadConfig

    structures = [molecule("CH3CH2OH"), bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)]
    for atoms in structures:
        atoms.rattle(0.05, seed=1)
    batch = {k: v.to(device) for k, v in collate([atoms_to_entry(a) for a in structures], dtype=torch.float64).items()}
    torch.manual_seed(0)
    model = FinetuneModel(BackboneConfig.tiny(), [HeadConfig(target="energy")], forces="gradient")
    model = model.double().to(device).eval()
    out = model(batch, build_graphs(batch, GraphConfig.uniform(6.0)))
    result = {name: out[name].detach().cpu() for name in ("energy", "forces")}
    if not all(value.isfinite().all() for value in result.values()):
        return result, "energy or forces are not finite"
    if reference is not None:
        for name, value in result.items():
            scale = reference[name].abs().max().clamp_min(1e-12)
            error = float((value - reference[name]).abs().max() / scale)
            if error > 1e-9:
                return result, f"{name} differ from the CPU's by {error:.3g} (relative to its largest)"
    return result, None


def main() -> int:
    import ase
    import torch

    import jmp_ext
    import jmp_ext.ops as ops
    from jmp_ext.ops._lib import _cuda_problem

    build = ops.build_info()
    print(f"jmp_ext {jmp_ext.__version__} ({jmp_ext.__file__})")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"ase {ase.__version__}, {platform.platform()}")
    print(f"extension: {build}")
    devices, passed, reference = ["cpu"], True, None
    if torch.cuda.is_available():
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        print(f"GPUs: {names}")
        problem = _cuda_problem()
        if problem is None:
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        elif not build["cuda"]:  # (a CPU-only build, JMP_EXT_CUDA=OFF: a choice, said, not a failure)
            print(f"  note: {problem}")
        else:  # (a driver older than the kernels' CUDA: GPUs there, the kernels cannot run)
            passed = _report("jmp_ext on these GPUs", problem)
    else:
        print("GPUs: none visible to torch")
    for device in devices:
        print(f"{device}:")
        try:
            passed &= _report("radius graph vs ASE's neighbour list", radius_graph_problem(device))
            result, problem = model_problem(device, reference)
            compared = " vs the CPU's" if reference is not None else ""
            reference = reference or result
            passed &= _report("GemNet-OC energy and gradient forces" + compared, problem)
        except Exception as error:  # (a kernel that fails to launch: the rest of the report still counts)
            passed = _report("ran", f"{type(error).__name__}: {error}")
    print("all checks passed" if passed else "some checks FAILED: please report them with this output")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
