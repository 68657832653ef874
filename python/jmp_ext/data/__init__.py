"""Datasets: a safe LMDB format, converters, statistics, samplers and built-in demo data.

    format.py    on-disk format (LMDB shards of pickle-free entries + metadata), validation
    writer.py    DatasetWriter: atomic writes
    dataset.py   LmdbDataset: random access, lazy per-process LMDB handles
    collate.py   collate: structures -> one flat batch
    stats.py     linear references, target mean/std, force RMS (stats.json)
    demo.py      make_demo: EMT-labelled catalysis / molecules / materials / md data

Command line: python -m jmp_ext.data {convert,split,stats,make-demo,info} (see __main__.py).
"""

from jmp_ext.data.collate import collate
from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.demo import make_demo
from jmp_ext.data.format import DataError
from jmp_ext.data.stats import compute_stats, load_stats, save_stats
from jmp_ext.data.writer import DatasetWriter, write_dataset

__all__ = [
    "DataError",
    "DatasetWriter",
    "LmdbDataset",
    "collate",
    "compute_stats",
    "load_stats",
    "make_demo",
    "save_stats",
    "write_dataset",
]
