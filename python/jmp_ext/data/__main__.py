"""Command line for datasets: python -m jmp_ext.data {convert,split,stats,make-demo,info} ..."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jmp_ext.data import format as fmt
from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.demo import make_demo
from jmp_ext.data.split import fraction_indices, read_index_file, split_dataset
from jmp_ext.data.stats import load_stats


def cmd_make_demo(args) -> None:
    root = make_demo(args.dir, seed=args.seed, scale=args.scale, progress=True)
    print(f"demo data in {root}: {json.loads((root / 'demo.json').read_text())['entries']}")


def cmd_split(args) -> None:
    num_entries = len(LmdbDataset(args.src))
    if args.index_file:
        parts = read_index_file(args.index_file, num_entries)
    else:
        fractions = {}
        for item in args.fractions.split(","):
            name, _, value = item.partition("=")
            fractions[name.strip()] = float(value)
        parts = fraction_indices(num_entries, fractions, seed=args.seed)
    paths = split_dataset(args.src, args.out, parts, overwrite=args.overwrite, progress=True)
    print(", ".join(f"{name}: {len(parts[name])} entries -> {path}" for name, path in paths.items()))


def cmd_stats(args) -> None:
    stats = load_stats(args.dir, recompute=args.recompute, progress=True)
    print(f"{args.dir}/{fmt.STATS_FILE}: {stats['num_entries']} entries, "
          f"{stats['avg_natoms']:.1f} atoms on average")
    for name, target in stats["targets"].items():
        after = " after linear references" if name == "energy" else ""
        print(f"  {name}{after}: mean {np.round(target['mean'], 6).tolist()}, "
              f"std {np.round(target['std'], 6).tolist()}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jmp_ext.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make-demo", help="generate the built-in EMT demo datasets")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of entries")
    p.set_defaults(run=cmd_make_demo)

    p = commands.add_parser("split", help="split a dataset into OUT/train, OUT/val, ...")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--fractions", default="train=0.8,val=0.1,test=0.1",
                   help="name=fraction,... (default %(default)s)")
    p.add_argument("--index-file", help='JSON {"train": [indices], ...} or .npz of index arrays')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
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
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
