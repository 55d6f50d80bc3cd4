"""Throughput from S3 (a moto server on loopback) against local disk, same dataset, one run.

    .venv/bin/python benchmarks/s3_vs_local.py     # about 1.5 minutes; prints markdown tables

1. Writes ``--clips`` (600) WAVs like UrbanSound8K's (1-4 s, mostly 44.1/48 kHz, mono and
   stereo, 16 and 24 bit) to a temporary folder, starts ``python -m moto.server`` on 127.0.0.1
   (``tests/s3server.py``) and uploads them.
2. Runs the same flow, ``read -> decode -> downmix -> resample 16 kHz -> pad 4 s -> batch 64``,
   one full epoch from local disk and one from ``s3://`` for each worker count (4, 8, 16
   threads), and reports samples/s, the CPU used by this process and by the S3 server, and the
   ratio S3 / local of the best worker count of each. Also one epoch from S3 with
   ``read(cache_dir=...)`` after a first epoch filled the cache (the multi-epoch case).
3. Uploads ``--tiny`` (10,000) tiny WAVs and measures the time to the first batch of a flow over
   them, listed from ``s3://``: listing and loader build, then the first batch; same from disk.

The moto server is a Python process on the same machine, serving one request at a time in
about 2.5 ms of CPU: it takes CPU from the pipeline, so the ratio is a lower bound of what a
real object store (on its own machines) gives.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows import Flow  # noqa: E402
from tests.s3server import (  # noqa: E402
    AWS_ENV_TO_UNSET,
    DUMMY_AWS_ENV,
    MotoServer,
    create_bucket,
    upload_dir,
)

# UrbanSound8K's mix, roughly: mostly 44.1 and 48 kHz, some 96 kHz and lower rates.
RATES = (44_100, 48_000, 96_000, 22_050, 16_000, 11_025)
RATE_WEIGHTS = (0.6, 0.2, 0.05, 0.07, 0.04, 0.04)
SUBTYPES = ("PCM_16", "PCM_24")
TARGET_RATE, SECONDS, BATCH = 16_000, 4.0, 64


def make_clips(root: Path, n: int, seed: int = 0) -> int:
    """``n`` WAVs under ``root/fold{k}/``, heterogeneous like UrbanSound8K's: 1-4 s (4 s for 40%),
    mixed sample rates, two thirds stereo, 16 or 24 bit; tones plus noise. Returns the bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        rate = int(rng.choice(RATES, p=RATE_WEIGHTS))
        channels = 1 if i % 3 == 0 else 2
        seconds = 4.0 if rng.random() < 0.4 else rng.uniform(1.0, 4.0)
        frames = int(rate * seconds)
        t = np.arange(frames) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
        audio = tone[:, None] + 0.05 * rng.standard_normal((frames, channels))
        path = root / f"fold{i % 10 + 1}" / f"clip-{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, rate, subtype=SUBTYPES[int(rng.random() < 0.3)])
        total += path.stat().st_size
    return total


def tiny_wav() -> bytes:
    """A 16-frame mono WAV (about 80 bytes)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16, dtype=np.float32), TARGET_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def audio_flow(url: str, storage_options: dict | None, cache_dir: str | None = None) -> Flow:
    return (Flow.files(url, extensions=[".wav"], storage_options=storage_options)
            .read(cache_dir=cache_dir).decode_audio().downmix().resample(TARGET_RATE)
            .pad(round(SECONDS * TARGET_RATE)).batch(BATCH))


def server_cpu(server: MotoServer) -> float:
    """CPU seconds the moto server process has used so far (0 where /proc is missing)."""
    try:
        with open(f"/proc/{server.proc.pid}/stat") as f:  # type: ignore[union-attr]
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def epoch(flow: Flow, workers: int, server: MotoServer) -> tuple[float, int, float, float]:
    """One full epoch (loader build included): seconds, samples, and the CPU cores this process
    and the S3 server used on average."""
    wall, cpu, served = time.perf_counter(), time.process_time(), server_cpu(server)
    samples = sum(len(batch["audio"]) for batch in flow.loader(num_workers=workers))
    seconds = time.perf_counter() - wall
    return (seconds, samples, (time.process_time() - cpu) / seconds,
            (server_cpu(server) - served) / seconds)


def throughput(local: Path, bucket: str, options: dict, workers: list[int], cache: str,
               server: MotoServer) -> None:
    """The epoch table, local and S3 alternating for each worker count."""
    remote = f"{bucket}/clips/**/*.wav"
    runs = [("local", str(local / "**" / "*.wav"), None), ("s3", remote, options)]
    epoch(audio_flow(remote, options), 4, server)  # warm up: imports, connections
    print("| source | worker threads | samples/s | CPU cores, this process | CPU cores, S3 server |")
    print("|---|---:|---:|---:|---:|")
    best: dict[str, tuple[float, int]] = {}
    for count in workers:
        for source, url, opts in runs:
            seconds, samples, cpu, served = epoch(audio_flow(url, opts), count, server)
            rate = samples / seconds
            print(f"| {source} | {count} | {rate:.0f} | {cpu:.2f} | {served:.2f} |")
            best[source] = max(best.get(source, (0.0, 0)), (rate, count))
    cached = audio_flow(remote, options, cache_dir=cache)
    epoch(cached, best["s3"][1], server)  # the first epoch fills the cache
    seconds, samples, cpu, served = epoch(cached, best["s3"][1], server)
    print(f"| s3 + cache_dir, 2nd epoch | {best['s3'][1]} | {samples / seconds:.0f} | {cpu:.2f} "
          f"| {served:.2f} |")
    (s3_rate, s3_workers), (local_rate, local_workers) = best["s3"], best["local"]
    print(f"\n**S3 / local, best worker count of each: {s3_rate / local_rate:.2f}** "
          f"({s3_rate:.0f} samples/s with {s3_workers} threads / {local_rate:.0f} with "
          f"{local_workers})\n")


def time_to_first_batch(root: Path, bucket: str, options: dict, count: int) -> None:
    """Write and upload ``count`` tiny WAVs, then time listing + first batch, local and S3."""
    blob = tiny_wav()
    started = time.perf_counter()
    names = [f"tiny/d{i % 100:02d}/t{i:05d}.wav" for i in range(count)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{bucket.removeprefix('s3://')}/{name}": blob for name in names}, batch_size=64)
    fs.invalidate_cache()
    print(f"{count} tiny files written and uploaded in {time.perf_counter() - started:.1f} s\n")
    print(f"| {count} tiny files | list + build the flow | then first batch of {BATCH} | total |")
    print("|---|---:|---:|---:|")
    for source, url, opts in (("local", str(root / "tiny"), None), ("s3", f"{bucket}/tiny", options)):
        started = time.perf_counter()
        flow = Flow.files(url, extensions=[".wav"], storage_options=opts).read().decode_audio()
        loader = flow.batch(BATCH).loader(num_workers=8)
        built = time.perf_counter()
        next(iter(loader))
        first = time.perf_counter()
        print(f"| {source} | {built - started:.2f} s | {first - built:.2f} s | "
              f"{first - started:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=600, help="audio clips in the throughput test")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--tiny", type=int, default=10_000, help="tiny files in the first-batch test")
    args = parser.parse_args()
    for name in AWS_ENV_TO_UNSET:  # never reach real AWS
        os.environ.pop(name, None)
    os.environ.update(DUMMY_AWS_ENV)

    with tempfile.TemporaryDirectory(prefix="flows-bench-") as tmp, MotoServer() as server:
        options = server.storage_options()
        bucket = create_bucket("flows-bench", options)
        local = Path(tmp) / "clips"
        started = time.perf_counter()
        size = make_clips(local, args.clips)
        upload_dir(local, f"{bucket}/clips", options)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{args.clips} clips, {size / 2**20:.1f} MiB, written and uploaded in "
              f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, load average {load}\n")
        throughput(local, bucket, options, args.workers, str(Path(tmp) / "cache"), server)
        time_to_first_batch(Path(tmp), bucket, options, args.tiny)


if __name__ == "__main__":
    main()
