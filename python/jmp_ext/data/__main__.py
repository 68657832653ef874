"""Command line for datasets: python -m jmp_ext.data {convert,split,stats,make-demo,info} ..."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lmdb
import numpy as np

from jmp_ext.data import format as fmt
from jmp_ext.data.convert import ENERGY_UNITS, LENGTH_UNITS, KeyMap, convert
from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.demo import make_demo
from jmp_ext.data.split import fraction_indices, group_labels, parse_fractions, read_index_file, split_dataset
from jmp_ext.data.stats import load_stats
from jmp_ext.interrupts import sigterm_interrupts
from jmp_ext.warn import plain_warnings


def cmd_make_demo(args) -> None:
    root = make_demo(args.dir, seed=args.seed, scale=args.scale, progress=True)
    print(f"demo data in {root}: {json.loads((root / 'demo.json').read_text(encoding='utf-8'))['entries']}")


def cmd_convert(args) -> None:
    properties, units = {}, {}
    for item in args.property:  # NAME[=KEY][:UNIT]
        text = item
        item, colon, unit = item.partition(":")
        name, _, key = item.partition("=")
        problem = ("no name" if not name else f"{name!r} given twice" if name in properties else
                   "no unit after ':'" if colon and not unit else None)
        if problem:
            raise ValueError(f"--property {text!r}: {problem} (NAME[=KEY][:UNIT], e.g. U_0:Hartree)")
        properties[name] = key or name
        if unit:
            units[name] = unit
    keys = KeyMap(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key, properties=properties,
                  property_units=units, energy_unit=args.energy_unit, length_unit=args.length_unit)
    report = convert(args.src, args.dst, keys=keys, source_format=args.format,
                     allow_pickle=args.allow_pickle, skip_invalid=args.skip_invalid,
                     select=args.select, overwrite=args.overwrite, shard_size=args.shard_size,
                     float_dtype=np.float32 if args.float32 else np.float64, progress=True,
                     subtract_reference=args.subtract_reference)
    print(f"wrote {report.written} entries to {args.dst}")
    # (in the source's units, converted: said, as a property's unit is, since no file records it;
    # the KeyMap's names, one for Å)
    energy, length = keys.energy_unit, keys.length_unit
    source_units = {"energy": energy, "forces": f"{energy}/{length}", "stress": f"{energy}/{length}^3"}
    for label, source in report.labels.items():
        unit = source_units[label]
        print(f"  {label} <- {source}" + (f", {unit} converted to {fmt.UNITS[label]}" if unit != fmt.UNITS[label]
                                          else "") + (" minus the frame logs' reference energies"
                                                      if label == "energy" and args.subtract_reference else ""))
    if report.oc20_logs:
        print(f"  sid, fid <- the OC20 frame logs (.txt) of {report.oc20_logs} file(s)")
    if length != "Å":
        print(f"  positions and cell: {length} converted to Å")
    for name, key in properties.items():
        print(f"  {name} <- {key}" + (f", {units[name]} converted to eV" if name in units else ", as stored (no unit)"))
    if report.skipped:
        print(f"skipped {len(report.skipped)} invalid entries:")
        for message in report.skipped[:20]:
            print(f"  {message}")
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more")
    if report.isolated_atom_energies:
        energies = ", ".join(f"{symbol}: {energy!r}" for symbol, energy in report.isolated_atom_energies.items())
        print(f"isolated-atom energies (eV), as the energy target's references: {{{energies}}}")


DEFAULT_FRACTIONS = "train=0.8,val=0.1,test=0.1"


def cmd_split(args) -> None:
    if args.index_file and args.fractions:
        raise ValueError("give --fractions or --index-file, not both")
    if args.index_file and args.group_by:
        raise ValueError("--group-by applies to --fractions: an --index-file gives each part's entries itself")
    source = LmdbDataset(args.src)
    num_entries = len(source)
    if args.index_file:
        parts = read_index_file(args.index_file, num_entries)
    else:
        groups = group_labels(source, args.group_by, progress=True) if args.group_by else None
        parts = fraction_indices(num_entries, parse_fractions(args.fractions or DEFAULT_FRACTIONS), seed=args.seed,
                                 groups=groups)
    paths = split_dataset(args.src, args.out, parts, overwrite=args.overwrite, progress=True)
    print(", ".join(f"{name}: {len(parts[name])} entries -> {path}" for name, path in paths.items()))


def cmd_stats(args) -> None:
    stats = load_stats(args.dir, recompute=args.recompute, progress=True)
    # A val or test split holds its train split's statistics, marked with that split's name
    # (stats.share_train_stats): "2700 entries" alone would misdescribe a 300-entry val.
    source = stats.get("source")
    whose = ("" if source in (None, Path(args.dir).resolve().name)
             else f"statistics of the training split ({source}): ")
    cached = (Path(args.dir) / fmt.STATS_FILE).is_file()  # (not on a read-only dataset: load_stats warned)
    print(f"{args.dir}{'/' + fmt.STATS_FILE if cached else ' (not cached)'}: {whose}{stats['num_entries']} entries, "
          f"{stats['avg_natoms']:.1f} atoms on average")
    for name, target in stats["targets"].items():
        after = " after linear references" if name == "energy" else ""
        print(f"  {name}{after}: mean {np.round(target['mean'], 6).tolist()}, "
              f"std {np.round(target['std'], 6).tolist()}")
        if name in stats.get("linrefs", {}):  # (what a target with linref: true trains on)
            fit = stats["linrefs"][name]
            print(f"  {name} after linear references (if trained with linref: true, a sum over atoms): "
                  f"mean {fit['mean']:.6g}, std {fit['std']:.6g}")
    if "force_rms" in stats:
        print(f"  force RMS: {stats['force_rms']:.6f} eV/Å")


def cmd_info(args) -> None:
    ds = LmdbDataset(args.dir)
    print(f"{args.dir}: {len(ds)} entries in {len(ds._shard_files)} shard(s), "
          f"{int(ds.natoms.sum())} atoms (min {ds.natoms.min()}, mean {ds.natoms.mean():.1f}, "
          f"max {ds.natoms.max()})")
    for name, field in ds.schema.items():
        shape = "[" + ",".join(map(str, field["shape"])) + "]"
        print(f"  {name:16s} {np.dtype(field['dtype']).name:8s} {shape:8s} {field['unit']}")
    for key, value in ds.info.items():  # (provenance; convert's list of skipped entries can be long)
        text = json.dumps(value)
        print(f"  {key}: {text if len(text) <= 100 else text[:96] + ' ...'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jmp_ext.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make-demo", help="generate the built-in EMT demo datasets")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the number of entries (a finite number > 0)")
    p.set_defaults(run=cmd_make_demo)

    p = commands.add_parser("convert", help="convert extxyz / ASE db / OC20-style LMDB / sGDML or rMD17 npz / "
                                            "ANI-1x, Transition1x or SPICE HDF5")
    p.add_argument("src", help="extxyz or other ase.io file (or a directory of extxyz / xyz files, as OC20's S2EF), "
                               "ASE .db, fairchem .aselmdb (dir), OC20/JMP .lmdb (dir), an sGDML (MD17, MD22) or "
                               "rMD17 .npz, or an HDF5 file of conformations (ANI-1x, Transition1x, SPICE; needs "
                               "h5py)")
    p.add_argument("dst")
    p.add_argument("--format", choices=["ase", "ase-db", "lmdb", "npz", "hdf5"], help="default: from SRC")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled OC20/JMP LMDBs (unpickling can run code: trusted files only)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip entries that fail to load or validate (and isolated atoms, which GemNet-OC "
                        "cannot use), and list them; a file of another format than extxyz with more than 10 "
                        "structures in a row that ase.io cannot parse is an error still")
    p.add_argument("--energy-key",
                   help="source key of the energy (default: REF_energy, energy, dft_energy, and y in pickled "
                        "LMDBs; none: drop it)")
    p.add_argument("--forces-key",
                   help="source key of the forces (default: REF_forces, forces, force, dft_force, dft_forces; "
                        "none: drop them)")
    p.add_argument("--stress-key",
                   help="source key of the stress (default: REF_stress, stress, then a virial: REF_virial, "
                        "REF_virials, virial, virials, dft_virial; a key of these names, in any case, is a virial, "
                        "stored as -virial/volume; none: drop it)")
    p.add_argument("--property", action="append", default=[], metavar="NAME[=KEY][:UNIT]",
                   help="also store a per-structure property (repeatable), e.g. U_0:Hartree; UNIT must be "
                        "an energy unit, converted to eV (a property without one is stored as it is)")
    p.add_argument("--energy-unit", default="eV", choices=list(ENERGY_UNITS),
                   help="the source's energy unit: the energy, the forces (ENERGY_UNIT/LENGTH_UNIT) and the "
                        "stress (ENERGY_UNIT/LENGTH_UNIT^3) are converted to eV, eV/Å and eV/Å^3")
    p.add_argument("--length-unit", default="Å", choices=list(LENGTH_UNITS),
                   help="the source's length unit: positions and cell, and the forces and stress with "
                        "--energy-unit (forces in another unit pair, e.g. Hartree/Bohr beside Å positions, "
                        "are not supported: convert them first)")
    p.add_argument("--subtract-reference", action="store_true",
                   help="OC20 S2EF: subtract each frame's reference energy, from the frame log (N.txt) beside "
                        "its N.extxyz, from its energy, as OC20's S2EF LMDBs and models have it (the logs' sid "
                        "and fid are read either way)")
    p.add_argument("--select", help="ASE db query selecting rows, or the HDF5 group to read (Transition1x's data, "
                                     "train, val or test)")
    p.add_argument("--float32", action="store_true", help="store floats as float32 (energies stay float64, "
                   "and so do properties given an energy UNIT)")
    p.add_argument("--shard-size", type=int, default=5000, help="entries per LMDB file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_convert)

    p = commands.add_parser("split", help="split a dataset into OUT/train, OUT/val, ...")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--fractions", help=f"name=fraction,... (default {DEFAULT_FRACTIONS})")
    p.add_argument("--index-file", help='JSON {"train": [indices], ...} or .npz of index arrays (instead of '
                                        '--fractions)')
    p.add_argument("--group-by", metavar="FIELD",
                   help="keep the entries that share FIELD in one part, e.g. sid (OC20's system: the frames "
                        "of one relaxation or trajectory); the fractions are then of the groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the parts' datasets in OUT (all of them at once, when every new "
                   "part is written: the disk needs room for both). OUT may hold no other "
                   "dataset (SRC aside), with or without --overwrite: it could be a part of an "
                   "older split")
    p.set_defaults(run=cmd_split)

    p = commands.add_parser("stats", help="compute (and cache) a dataset's statistics")
    p.add_argument("dir")
    p.add_argument("--recompute", action="store_true", help="ignore a cached stats.json")
    p.set_defaults(run=cmd_stats)

    p = commands.add_parser("info", help="show a dataset's size and schema")
    p.add_argument("dir")
    p.set_defaults(run=cmd_info)

    args = parser.parse_args(argv)
    try:
        with sigterm_interrupts(), plain_warnings():  # (a scheduler's stop cleans up as Ctrl-C does)
            args.run(args)
        sys.stdout.flush()  # (here, for a closed pipe to raise in this try, not at exit)
    except BrokenPipeError:  # (`info DIR | head`: the reader has what it wanted)
        # Python's own flush of stdout at exit would fail again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # DataError is a ValueError; OSError: a missing or unreadable file, an existing target
    # without --overwrite, a full disk, a pickled LMDB without --allow-pickle (PermissionError).
    except (ValueError, OSError, lmdb.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2  # (as argparse's usage errors and python -m jmp_ext.train's)
    except KeyboardInterrupt as error:  # (datasets, stats files and a split's parts are written atomically)
        # With a message when that is not all: a split interrupted after its parts were in place.
        message = str(error) or ("no dataset was left half-written (a dataset is written whole, a "
                                 "split's parts all or none); run the command again")
        print(f"\ninterrupted: {message}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
