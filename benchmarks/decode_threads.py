"""Does decode + downmix + resample + pad scale with threads? 1 vs 2 threads, three ways to decode.

- ``BytesIO``: soundfile reading a ``BytesIO`` (the old path: libsndfile calls back into Python,
  which takes the GIL, for every read);
- ``memfd``: the bytes written to an anonymous in-memory file that libsndfile reads itself (how
  flows decodes bytes in memory: Parquet-embedded audio, remote files);
- ``path``: flows' ``read().decode_audio()`` on local files (libsndfile opens the path).

Each way runs the same clips through ``decode -> mono -> 16 kHz -> 4 s`` in a pool of 1 and then
2 threads and reports the speed-up (2 means perfect scaling on 2 free cores). On a shared machine
that ratio is noisy, so it also counts what does not depend on the load: the Python callbacks
libsndfile makes per clip (each takes the GIL). Usage:
``PYTHONPATH=. python benchmarks/decode_threads.py [--clips 48] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from flows.stages.audio import DecodeAudio, Downmix, PadTrim, Resample
from flows.stages.read import ReadBytes

RATE, FRAMES = 16_000, 64_000


def write_clips(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"clip{i:03d}.{'flac' if i % 2 else 'wav'}"
        audio = (0.1 * rng.standard_normal((44_100 * 4, 2))).astype(np.float32)
        soundfile.write(path, audio, 44_100, subtype="PCM_16")
        paths.append(path)
    return paths


def bytesio_decode(item: dict) -> dict:
    samples, rate = soundfile.read(io.BytesIO(item["bytes"]), dtype="float32", always_2d=True)
    import torch

    return {"audio": torch.from_numpy(np.ascontiguousarray(samples.T)), "sample_rate": rate}


def callbacks(work: Callable[[int], None], clips: int) -> float:
    """Calls per clip of soundfile's virtual-IO callbacks (``vio_*``: each takes the GIL)."""
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call" and frame.f_code.co_name.startswith("vio_")

    sys.setprofile(profile)
    try:
        for i in range(clips):
            work(i)
    finally:
        sys.setprofile(None)
    return calls / clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(Path(tmp), args.clips)
        blobs = [p.read_bytes() for p in paths]
        tail = [Downmix(), Resample(RATE), PadTrim(FRAMES)]
        read = ReadBytes().referring("local")
        ways = {
            "BytesIO": (lambda i: {"bytes": blobs[i]}, [bytesio_decode, *tail]),
            "memfd": (lambda i: {"bytes": blobs[i]}, [DecodeAudio(), *tail]),
            "path": (lambda i: read({"path": str(paths[i])}), [DecodeAudio(), *tail]),
        }
        for name, (record, stages) in ways.items():
            def work(i: int, record=record, stages=stages) -> None:
                item = record(i)
                for stage in stages:
                    item = stage(item)

            best = {1: float("inf"), 2: float("inf")}
            pools = {threads: ThreadPoolExecutor(threads) for threads in best}
            for pool in pools.values():
                list(pool.map(work, range(min(4, args.clips))))  # warm up
            for _ in range(args.rounds):  # interleaved, best of: the machine may be shared
                for threads, pool in pools.items():
                    start = time.perf_counter()
                    list(pool.map(work, range(args.clips)))
                    best[threads] = min(best[threads], time.perf_counter() - start)
            for pool in pools.values():
                pool.shutdown()
            calls = callbacks(work, min(8, args.clips))
            print(f"{name:8s} 1 thread {args.clips / best[1]:6.1f} clips/s, 2 threads "
                  f"{args.clips / best[2]:6.1f} clips/s: speed-up {best[1] / best[2]:.2f}x; "
                  f"{calls:.0f} Python read callbacks per clip", flush=True)


if __name__ == "__main__":
    main()
