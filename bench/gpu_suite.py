"""The GPU figures that issues 2, 3 and 4 ask for, in one run on a lent GPU.

bench/gpu_run.sh builds the package with CUDA, runs the `cuda` tests, then this script. Here,
without a GPU, the same code runs as a dry run on small sizes:

    PYTHONPATH=python python bench/gpu_suite.py --device cpu --quick

Each figure is the median of the timed calls after warm-up calls, timed with CUDA events on a
GPU (perf_counter on the CPU). Every section runs even if another one failed; a failure is
recorded in the JSON with its message. Sections and their targets:

- radius_graph: a batch of 512 systems x 256 atoms (rattled fcc Cu, periodic) at 5 A;
  target < 1 ms on an H100 with one host synchronisation.
- indices: symmetrising the main graph, triplets, mixed triplets and quadruplets of the
  32-slab batch of bench_interaction_indices.py, int32 and int64 outputs; target < 1 ms.
- reductions: segment_sum, scatter_sum (deterministic and atomic), gather and segment_max at
  E = 2e6 rows of 64 float32 features, as GB/s (bytes read + written) against a device copy
  of the same bytes; target > 60 % of the bandwidth.
- syncs: the host synchronisations of one training step of the tiny model (its graphs built
  in the step), from torch.profiler's CUDA runtime calls and torch's sync debug mode.
- model: a direct-force training step (forward + backward) of the tiny config, JMP-S and JMP-L
  on the 32 OC20-like slabs of bench_model.py, in float32 and under bf16 autocast, eager and
  (with --compile) under torch.compile; ms, atoms/s and peak memory. (The original is not
  installed there, so the 0.5x target needs its figure from elsewhere.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).parent))
import bench_interaction_indices as indices_bench  # noqa: E402
import bench_model  # noqa: E402

import jmp_ext.ops as ops  # noqa: E402
from jmp_ext.graphs import symmetrize  # noqa: E402


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def radius_graph_figures(device: torch.device, quick: bool) -> dict:
    num_systems = 8 if quick else 512
    cell_atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))  # 256 atoms
    rng = np.random.default_rng(0)
    pos = np.concatenate([cell_atoms.positions + rng.normal(0, 0.05, cell_atoms.positions.shape)
                          for _ in range(num_systems)])
    pos = torch.tensor(pos, dtype=torch.float32, device=device)
    cell = torch.tensor(np.asarray(cell_atoms.cell), dtype=torch.float32, device=device).expand(num_systems, 3, 3)
    natoms = torch.full((num_systems,), len(cell_atoms), device=device)
    pbc = torch.ones(num_systems, 3, dtype=torch.bool, device=device)

    def run():
        return ops.radius_graph(pos, 5.0, natoms=natoms, cell=cell.contiguous(), pbc=pbc)

    edges = run()[0].shape[1]
    return {"systems": num_systems, "atoms": int(pos.shape[0]), "cutoff_A": 5.0, "edges": edges,
            "ms": timed(run, device, repeats=5 if quick else 20)}


def index_figures(device: torch.device, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    num_atoms, graphs = indices_bench._batch([indices_bench._slab(rng) for _ in range(4 if quick else 32)])
    graphs = {name: {k: v.to(device) for k, v in g.items()} for name, g in graphs.items()}
    out = {"atoms": num_atoms, "main_edges": graphs["main"]["edge_index"].shape[1]}
    for dtype in (torch.int32, torch.int64):
        index = {"index_dtype": dtype}
        out[f"all_{str(dtype)[6:]}_ms"] = timed(lambda: indices_bench._all(ops, num_atoms, graphs, **index),
                                                 device, repeats=5 if quick else 20)
    out["symmetrize_ms"] = timed(lambda: symmetrize(graphs["main_one_way"]), device, repeats=5 if quick else 20)
    out["quadruplets"] = int(ops.quadruplets(graphs["main"], graphs["qint"], num_atoms)["out"].shape[0])
    return out


def reduction_figures(device: torch.device, quick: bool) -> dict:
    rows, features = (20_000 if quick else 2_000_000), 64
    segments = rows // 32
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, segments, (rows,), generator=gen).to(device)
    sorted_index = torch.sort(index).values
    ptr = torch.searchsorted(sorted_index, torch.arange(segments + 1, device=device))
    src = torch.randn(rows, features, generator=gen).to(device)
    table = torch.randn(segments, features, generator=gen).to(device)
    repeats = 5 if quick else 20
    nbytes = 4 * features
    copy_ms = timed(lambda: src.clone(), device, repeats)
    copy_gbs = 2 * rows * nbytes / copy_ms / 1e6
    cases = {
        # (fn, bytes read + written, the index not counted)
        "segment_sum": (lambda: ops.segment_sum(src, ptr), (rows + segments) * nbytes),
        "segment_max": (lambda: ops.segment_max(src, ptr), (rows + segments) * nbytes),
        "scatter_sum": (lambda: ops.scatter_sum(src, index, segments), (rows + segments) * nbytes),
        "scatter_sum_atomic": (lambda: ops.scatter_sum(src, index, segments, deterministic=False),
                               (rows + segments) * nbytes),
        "gather": (lambda: ops.gather(table, index), 2 * rows * nbytes),
        "index_add_ (torch)": (lambda: torch.zeros_like(table).index_add_(0, index, src), (rows + segments) * nbytes),
    }
    out = {"rows": rows, "features": features, "copy_GBps": copy_gbs}
    for name, (fn, moved) in cases.items():
        ms = timed(fn, device, repeats)
        out[name] = {"ms": ms, "GBps": moved / ms / 1e6, "of_copy": moved / ms / 1e6 / copy_gbs}
    return out


def model_figures(device: torch.device, quick: bool, compile: bool) -> dict:
    num_slabs = 2 if quick else 32
    batch, config = bench_model.batch_and_config("slabs", num_slabs)
    batch = {k: v.to(device) for k, v in batch.items()}
    atoms = int(batch["natoms"].sum())
    out = {"slabs": num_slabs, "atoms": atoms}
    for size in ("tiny",) if quick else ("tiny", "jmp_s", "jmp_l"):
        for compiled in (False, True) if compile else (False,):
            for precision in ("float32", "bf16"):
                model = bench_model.make_model(size, "direct").to(device)
                if compiled:
                    model.compile(dynamic=True)

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        return bench_model.step(model, batch, config, "direct")

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = timed(step, device, repeats=3 if quick else 10, warmup=3)
                entry = {"ms": ms, "atoms_per_s": atoms / ms * 1e3}
                if device.type == "cuda":
                    entry["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
                out[f"{size}_{precision}{'_compiled' if compiled else ''}"] = entry
                print(size, precision, "compiled" if compiled else "eager", entry, flush=True)
                model = step = None  # (this size's model goes before the next one is built)
    return out


def sync_figures(device: torch.device, quick: bool) -> dict:
    """Host synchronisations in one direct-force step of the tiny model on the slabs (graphs
    built in the step): the CUDA runtime calls that wait (from torch.profiler, our kernels'
    status read-backs included), and the syncs torch's own debug mode reports (.item(),
    nonzero, a size read back), with the first few of their sources. The plan for the first:
    one deferred status check per step instead of one read-back per reduction."""
    import warnings

    batch, config = bench_model.batch_and_config("slabs", 2 if quick else 32)
    batch = {k: v.to(device) for k, v in batch.items()}
    model = bench_model.make_model("tiny", "direct").to(device)
    bench_model.step(model, batch, config, "direct")  # (warm-up: allocator, lazy init)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        bench_model.step(model, batch, config, "direct")
    waits = {}
    for event in profile.events():
        if event.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize") or (
                event.name.startswith("cudaMemcpy") and "Async" not in event.name):
            waits[event.name] = waits.get(event.name, 0) + 1
    out = {"runtime_waits": waits, "runtime_memcpy_async": sum(e.name == "cudaMemcpyAsync" for e in profile.events())}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                bench_model.step(model, batch, config, "direct")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out["torch_syncs"] = len(caught)
        out["torch_sync_sources"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})[:30]
    return out


SECTIONS = {"radius_graph": radius_graph_figures, "indices": index_figures,
            "reductions": reduction_figures, "syncs": sync_figures, "model": model_figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes: a dry run of the code paths")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    parser.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "jmp_ext": ops.build_info(), "quick": args.quick,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in args.only or SECTIONS:
        begin = time.perf_counter()
        try:
            extra = {"compile": args.compile} if name == "model" else {}
            results[name] = SECTIONS[name](device, args.quick, **extra)
        except Exception as error:  # every section runs: record the failure and go on
            results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.perf_counter() - begin, 1)
        print(name, json.dumps(results[name], indent=1, default=str), flush=True)
        if args.out:  # written after every section, so a run stopped at its time limit keeps them
            args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
