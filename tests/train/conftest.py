import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers import write_molecules  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Two small tasks: 'mol' (non-periodic) and 'box' (molecules in a periodic box)."""
    root = tmp_path_factory.mktemp("data")
    for name, periodic, seed in [("mol", False, 0), ("box", True, 1)]:
        write_molecules(root / name / "train", 12, seed=seed, periodic=periodic)
        write_molecules(root / name / "val", 4, seed=seed + 10, periodic=periodic)
        write_molecules(root / name / "test", 4, seed=seed + 20, periodic=periodic)
    return root


@pytest.fixture(autouse=True)
def calculator_warnings_anew():
    """The calculator warns of truncated neighbour lists once per checkpoint in a process: each
    test starts as a fresh process would."""
    from jmp_ext import calculator

    calculator._TRUNCATION_WARNED_FILES.clear()
    calculator._TRUNCATION_WARNED_MODELS.clear()
