import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))
import pytest

import jmp_ext.ops as ops

from helpers import brute_radius_graph, write_molecules


@pytest.fixture(autouse=True)
def _radius_graph(monkeypatch):
    # Until jmp_ext.ops.radius_graph is built in, the graphs use the brute-force reference.
    if not hasattr(ops, "radius_graph"):
        monkeypatch.setattr(ops, "radius_graph", brute_radius_graph, raising=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Two small tasks: 'mol' (non-periodic) and 'box' (molecules in a periodic box)."""
    root = tmp_path_factory.mktemp("data")
    for name, periodic, seed in [("mol", False, 0), ("box", True, 1)]:
        write_molecules(root / name / "train", 12, seed=seed, periodic=periodic)
        write_molecules(root / name / "val", 4, seed=seed + 10, periodic=periodic)
        write_molecules(root / name / "test", 4, seed=seed + 20, periodic=periodic)
    return root
