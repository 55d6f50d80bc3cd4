"""How start-up and restore grow with the dataset: one run, each case in a fresh child process.

    PYTHONPATH=$PWD python benchmarks/growth.py --sizes 10000 1000000 100000000

For each size, writes (once, under ``--data``) a Parquet table of ``path`` and ``label`` (50
classes, 100,000 rows per row group). Then for each plan (``fixed``: ``.batch``; ``stratified``:
``.stratify("label")``) and world size (1, and 8 ranks simulated in one process, global batch
256 in both), a fresh child process builds ``Flow.table(...).shuffle(seed=0)`` and measures the
cases below. The ``manifest`` plan reads an Arrow file manifest (``path``, ``size``, ``mtime``,
as ``flows manifest`` writes) of the same size instead, memory-mapped, with fixed batches and
2 process workers (world size 1 only); its RSS adds the workers' peak.

- **first batch**: from building the flow to every rank's first batch;
- **restore**: from building a fresh flow to every rank's first batch after loading a state at
  90% of the epoch (the state of a loader after one batch, with its position moved there);
- **peak RSS** of the child (``ru_maxrss``).

Children run under a memory limit (``--max-gb``) and a time limit (``--timeout``); a case that
exceeds one is reported as such. Prints a markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GLOBAL_BATCH = 256
GROUP_ROWS = 100_000
CLASSES = 50


def make_table(path: Path, rows: int) -> None:
    """``path`` (``clips/<row>.wav``) and ``label`` (``c00``..``c49``) columns, written in chunks."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    names = pa.array([f"c{k:02d}" for k in range(CLASSES)])
    schema = pa.schema([("path", pa.string()), ("label", pa.string())])
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, rows, 1_000_000):
            ids = np.arange(start, min(rows, start + 1_000_000))
            paths = pc.binary_join_element_wise("clips/", pa.array(ids).cast(pa.string()), ".wav", "")
            labels = pc.take(names, pa.array((ids * 7919) % CLASSES))
            writer.write_table(pa.table({"path": paths, "label": labels}, schema=schema),
                               row_group_size=GROUP_ROWS)
    partial.rename(path)


def make_manifest(path: Path, rows: int) -> None:
    """An Arrow IPC file manifest of ``rows`` files, written in record batches."""
    from flows.sources.manifest import SCHEMA

    if path.exists():
        return
    partial = path.with_suffix(".partial")
    with pa.ipc.new_file(partial, SCHEMA) as writer:
        for start in range(0, rows, 1_000_000):
            ids = np.arange(start, min(rows, start + 1_000_000))
            paths = pc.binary_join_element_wise("/data/clips/", pa.array(ids).cast(pa.string()), ".wav", "")
            writer.write_batch(pa.record_batch([paths.cast(pa.large_string()), pa.array(ids % 50_000),
                                                pa.array(np.full(len(ids), 1.7e9))], schema=SCHEMA))
    partial.rename(path)


def _seek(state: Any, batch: int) -> None:
    """Move the sampler position(s) inside a loader state to global batch ``batch``."""
    if isinstance(state, dict):
        if {"epoch", "batch", "slot"} <= state.keys():
            state.update(batch=batch, slot=0)
        for value in state.values():
            _seek(value, batch)
    elif isinstance(state, list):
        for value in state:
            _seek(value, batch)


def measure(table: str, plan: str, world: int) -> dict[str, float]:
    """One case, in this process: seconds to the first batch, to the first batch after a restore
    at 90% of the epoch, and the peak RSS in GB."""
    from flows import Flow

    def loaders() -> list[Any]:
        size = GLOBAL_BATCH // world
        if plan == "manifest":
            flow = Flow.table(table).shuffle(seed=0).batch(size)
            return [flow.loader(num_workers=2, method="process", rank=r, world_size=world, prefetch=0)
                    for r in range(world)]
        flow = Flow.table(table, columns=["path", "label"]).shuffle(seed=0)
        flow = flow.batch(size) if plan == "fixed" else flow.stratify("label", size)
        return [flow.loader(rank=r, world_size=world, prefetch=0) for r in range(world)]

    start = time.perf_counter()
    built = loaders()
    firsts = [next(iter(ld)) for ld in built]
    first = time.perf_counter() - start
    assert all(len(b["path"]) == GLOBAL_BATCH // world for b in firsts)
    state = built[0].state_dict()
    _seek(state, int(0.9 * len(built[0])))
    for ld in built:
        getattr(ld, "close", lambda: None)()
    del built, firsts

    start = time.perf_counter()
    resumed = loaders()
    for ld in resumed:
        ld.load_state_dict(state)
        next(iter(ld))
    restore = time.perf_counter() - start
    for ld in resumed:
        getattr(ld, "close", lambda: None)()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           + 2 * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    return {"first_s": round(first, 3), "restore_s": round(restore, 3), "rss_gb": round(rss, 3)}


def run_child(table: Path, plan: str, world: int, max_gb: float, timeout: float) -> dict[str, Any]:
    def limit() -> None:
        cap = int(max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, __file__, "--child", str(table), plan, str(world)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]
        return {"error": "MemoryError" if "MemoryError" in done.stderr else last[:80]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 100_000_000])
    parser.add_argument("--plans", nargs="+", default=["fixed", "stratified", "manifest"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--data", default="/tmp/flows-growth")
    parser.add_argument("--max-gb", type=float, default=16.0, help="address-space limit per child")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    parser.add_argument("--skip", nargs="*", default=[], metavar="PLAN:WORLD:ROWS",
                        help="cases not to run (e.g. too long for the machine)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=3, metavar=("TABLE", "PLAN", "WORLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        table, plan, world = args.child
        print(json.dumps(measure(table, plan, int(world))))
        return
    results = []
    print("| rows | plan | ranks | first batch (s) | restore at 90% (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for rows in args.sizes:
        table = Path(args.data) / f"rows{rows}.parquet"
        started = time.perf_counter()
        make_table(table, rows)
        if "manifest" in args.plans:
            make_manifest(table.with_suffix(".arrow"), rows)
        print(f"<!-- {rows} rows: data ready in {time.perf_counter() - started:.0f} s -->", flush=True)
        for plan in args.plans:
            for world in args.worlds if plan != "manifest" else [1]:
                path = table.with_suffix(".arrow") if plan == "manifest" else table
                result: dict[str, Any] = {"rows": rows, "plan": plan, "world": world}
                skipped = f"{plan}:{world}:{rows}" in args.skip
                result.update({"error": "not run (--skip)"} if skipped else
                              run_child(path, plan, world, args.max_gb, args.timeout))
                results.append(result)
                cells = ([result["error"], "", ""] if "error" in result else
                         [result["first_s"], result["restore_s"], result["rss_gb"]])
                print(f"| {rows:.0e} | {plan} | {world} | " + " | ".join(map(str, cells)) + " |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
