"""Datasets: a safe LMDB format, converters, statistics, samplers and built-in demo data.

    format.py    on-disk format (LMDB shards of pickle-free entries + metadata), validation
    writer.py    DatasetWriter: atomic writes
    dataset.py   LmdbDataset: random access; LMDB handles reopened in each new process
    collate.py   collate: structures -> one flat batch
    samplers.py  AtomBalancedBatchSampler (DDP-aware), TemperatureSampler (p_i ~ N_i^(1/T))
    stats.py     linear references, target mean/std, force RMS (stats.json)
    split.py     train/val/test parts by seeded fractions or an index file
    convert.py   extxyz / ASE db / pickled OC20-JMP LMDB -> this format; atoms_to_entry: ASE
                 Atoms -> one entry (collate a list of them for a model)
    demo.py      make_demo: EMT-labelled catalysis / molecules / materials / md data

Command line: python -m jmp_ext.data {convert,split,stats,make-demo,info} (see __main__.py).
"""

from jmp_ext.data.collate import collate
from jmp_ext.data.convert import KeyMap, atoms_to_entry, convert
from jmp_ext.data.dataset import LmdbDataset, MultiDataset
from jmp_ext.data.demo import make_demo
from jmp_ext.data.format import DataError
from jmp_ext.data.samplers import AtomBalancedBatchSampler, TemperatureSampler
from jmp_ext.data.split import fraction_indices, split_dataset
from jmp_ext.data.stats import compute_stats, load_stats, save_stats
from jmp_ext.data.writer import DatasetWriter, write_dataset

__all__ = [
    "AtomBalancedBatchSampler",
    "DataError",
    "DatasetWriter",
    "KeyMap",
    "LmdbDataset",
    "MultiDataset",
    "TemperatureSampler",
    "atoms_to_entry",
    "collate",
    "compute_stats",
    "convert",
    "fraction_indices",
    "load_stats",
    "make_demo",
    "save_stats",
    "split_dataset",
    "write_dataset",
]
