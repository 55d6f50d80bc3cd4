"""What holds the GIL in flows' thread workers, measured with py-spy.

    benchmarks/.venv/bin/python benchmarks/gil.py benchmarks/_data/urbansound8k.json

(``benchmarks/run.sh`` installs py-spy in ``benchmarks/.venv`` and writes the dataset file.)

Runs 2 epochs of the benchmark's flows pipeline with 2 thread workers twice under
``py-spy record``: once sampling every thread on the CPU, once only threads holding the GIL
(``--gil``). For each stage, the share of its on-CPU samples taken while it held the GIL: near 0%
lets the other worker run; near 100% serializes the workers.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = {"read": "ReadBytes.__call__", "decode_audio": "DecodeAudio.__call__",
          "downmix": "Downmix.__call__", "resample": "Resample.__call__", "pad": "PadTrim.__call__",
          "collate": "Collate.__call__"}
WORKER = "concurrent/futures/thread.py"  # frames of a worker thread
PY_SPY = Path(sys.executable).parent / "py-spy"  # installed beside this Python, else on PATH


def loop(dataset: str) -> None:
    sys.path.insert(0, str(HERE))
    import run

    loader = run.flows_loader(json.loads(Path(dataset).read_text()), 2, "thread")
    for _ in range(2):
        for _batch in loader:
            pass
    loader.close()


def samples(path: Path) -> collections.Counter:
    """Samples per stage of the worker threads (``other``: the rest of their time)."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        if WORKER in stack:
            stage = next((name for name, frame in STAGES.items() if frame in stack), "other")
            counts[stage] += int(n)
    return counts


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "loop":
        loop(sys.argv[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label, extra in (("on CPU", []), ("holding the GIL", ["--gil"])):
            out = Path(tmp) / f"{len(runs)}.txt"
            py_spy = str(PY_SPY) if PY_SPY.exists() else "py-spy"
            subprocess.run([py_spy, "record", "--format", "raw", "--rate", "200", "--threads", *extra,
                            "-o", str(out), "--", sys.executable, __file__, "loop", sys.argv[1]],
                           check=True, capture_output=True, cwd=HERE.parent)
            runs[label] = samples(out)
    on_cpu, gil = runs["on CPU"], runs["holding the GIL"]
    print(f"{'stage':<14}{'on-CPU samples':>16}{'holding the GIL':>17}{'share':>8}")
    for stage in sorted(on_cpu, key=lambda s: -on_cpu[s]):
        print(f"{stage:<14}{on_cpu[stage]:>16}{gil[stage]:>17}{100 * gil[stage] / on_cpu[stage]:>7.0f}%")
    total = sum(on_cpu.values())
    print(f"{'all':<14}{total:>16}{sum(gil.values()):>17}{100 * sum(gil.values()) / total:>7.0f}%")


if __name__ == "__main__":
    main()
