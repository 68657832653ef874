"""Turn a pytest-benchmark JSON of bench_reductions.py or bench_interaction_indices.py into the
markdown ratio tables of bench/README.md.

    python bench/report.py bench/.benchmarks/reductions.json

Times are the minimum over rounds (on a shared machine, noise only ever adds time). A ratio
"x vs B" is time(B) / time(jmp_ext): above 1, jmp_ext is faster.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        params = bench["params"]
        impl = params["impl"]
        if params.get("index_dtype") == "int32":  # bench_interaction_indices' int32 outputs
            impl += " int32"
        rows.append({"group": bench["group"], "impl": impl,
                     "min": bench["stats"]["min"], "extra": bench["extra_info"]})
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def reductions(rows: list[dict]) -> None:
    # group = "<op> <direction> <size> <threads>thr"
    tables = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        op, direction, size, threads = row["group"].split()
        tables[f"{op} {direction}"][(size, threads)][row["impl"]] = row
    for title, table in tables.items():
        baselines = sorted({i for cells in table.values() for i in cells} - {"jmp_ext", "copy"})
        print(f"\n**{title}**\n")
        head = ["size", "threads", "jmp_ext ms", *[f"x vs {b}" for b in baselines],
                "jmp_ext GB/s", "copy GB/s", "% of copy"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for (size, threads), cells in table.items():
            ours, copy = cells["jmp_ext"], cells["copy"]
            ours_bw = ours["extra"]["bytes_moved"] / ours["min"] / 1e9
            copy_bw = copy["extra"]["bytes_moved"] / copy["min"] / 1e9
            ratios = [f"{cells[b]['min'] / ours['min']:.2f}" if b in cells else "" for b in baselines]
            print(f"| {size} | {threads} | {_ms(ours['min'])} | " + " | ".join(ratios) +
                  f" | {ours_bw:.2f} | {copy_bw:.2f} | {100 * ours_bw / copy_bw:.0f}% |")


def indices(rows: list[dict]) -> None:
    # group = "indices <batch> <step> <threads>thr"
    table = defaultdict(dict)
    for row in rows:
        _, batch, step, threads = row["group"].split()
        table[(batch, step, threads)][row["impl"]] = row
    head = ["batch", "step", "threads", "outputs", "jmp_ext ms", "torch twin ms", "x vs twin",
            "write floor ms", "jmp_ext / floor"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (batch, step, threads), cells in table.items():
        twin = cells["torch_twin"]["min"]
        for dtype, suffix in (("int64", ""), ("int32", " int32")):
            ours, floor = cells["jmp_ext" + suffix]["min"], cells["write_floor" + suffix]["min"]
            print(f"| {batch} | {step} | {threads} | {dtype} | {_ms(ours)} | {_ms(twin)} | {twin / ours:.1f} | "
                  f"{_ms(floor)} | {ours / floor:.2f} |")
    sizes = {k[0]: cells["jmp_ext"]["extra"] for k, cells in table.items() if k[1] == "all"}
    for batch, extra in sizes.items():
        print(f"\n{batch}: " + ", ".join(f"{k} {v:,}" for k, v in extra.items()))


if __name__ == "__main__":
    rows = _rows(sys.argv[1])
    (indices if rows[0]["group"].startswith("indices") else reductions)(rows)
