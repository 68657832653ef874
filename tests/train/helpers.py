"""Test helpers for the trainer: tiny EMT-labelled datasets."""

from __future__ import annotations

import numpy as np


def write_molecules(path, count: int, seed: int, periodic: bool = False, classes: int = 0,
                    stress: bool = False, u0: bool = False, r2: bool = False, u0_unit: str = "") -> str:
    """A small EMT-labelled dataset (energy, forces) of rattled molecules, with its stats.json;
    with `classes`, also a class label `cls` (int64, entry k has class k % classes); with
    `stress` (periodic), the stress [3, 3] (eV/Å^3); with `u0`, an extensive scalar `u0` =
    energy - sum_i 100 Z_i eV (large per-element references, like QM9's U_0); with `r2`, a
    spatial extent `r2` = sum_i |r_i - COM|^2 (Å^2, like QM9's R²). u0_unit: the unit u0 is
    recorded in ('' as stored, or 'eV', as convert's --property u0:Hartree records it)."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats

    rng = np.random.default_rng(seed)
    names = ["H2O", "NH3", "CH4", "CO2", "HCN", "H2CO", "CH3OH", "C2H4"]
    with DatasetWriter(path, overwrite=True, units={"u0": u0_unit} if u0 else None) as writer:
        for k in range(count):
            atoms = molecule(names[k % len(names)])
            atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
            if periodic:
                atoms.cell = np.eye(3) * 6.0
                atoms.pbc = True
            atoms.calc = EMT()
            n = len(atoms)
            writer.add({"pos": atoms.positions.copy(), "atomic_numbers": atoms.numbers.copy(),
                        "cell": atoms.cell.array.copy(), "pbc": atoms.pbc.copy(), "tags": np.full(n, 2),
                        "fixed": np.zeros(n, bool), "energy": np.array(atoms.get_potential_energy()),
                        "forces": atoms.get_forces(), **({"cls": np.array(k % classes)} if classes else {}),
                        **({"stress": atoms.get_stress(voigt=False)} if stress else {}),
                        **({"u0": np.array(atoms.get_potential_energy() - 100.0 * atoms.numbers.sum())}
                           if u0 else {}),
                        **({"r2": np.array(((atoms.positions - atoms.get_center_of_mass()) ** 2).sum())}
                           if r2 else {})})
    save_stats(path, compute_stats(LmdbDataset(path)))
    return str(path)
