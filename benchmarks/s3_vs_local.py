"""Throughput from S3 against local disk, same dataset, one run: ``rclone serve s3`` (Go) and moto
(Python) on loopback, each read through flows' two S3 clients (obstore, the default, and s3fs).

    .venv/bin/python benchmarks/s3_vs_local.py --clips 150 --workers 4 8 --repeats 3

1. Writes ``--clips`` WAVs like UrbanSound8K's (1-4 s, mostly 44.1/48 kHz, mono and stereo, 16 and
   24 bit) to a temporary folder, starts ``rclone serve s3`` on it and ``python -m moto.server``
   (``tests/s3server.py``) with the same clips uploaded.
2. Runs ``read -> decode -> downmix -> resample 16 kHz -> pad 4 s -> batch 64``, one full epoch
   per configuration (source x client x thread workers), and reports samples/s, this process's CPU
   per sample (the client's cost: what flows controls) and the server's CPU per sample (on a real
   object store, not ours). Headline: **best S3 config / best local config**, per server.
3. Per GET (sequential whole reads of the clips, ~100-700 KiB): client CPU and server CPU for
   s3fs ``cat_file``, obstore through its fsspec adapter, flows.storage.io with obstore (``read_bytes``,
   size from the listing) and s3torchconnector's ``S3Client.get_object`` where installed.
4. ``--tiny`` tiny WAVs in one prefix: listing + flow build, then the first batch, per server and
   client; and flows' per-object overhead over obstore's raw listing.

Everything (servers included) shares this machine's CPUs, so the end-to-end ratio is bounded by
the server's CPU per GET; the client-CPU ratio is what transfers to a real object store.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows import Flow  # noqa: E402
from flows.storage import io as fio  # noqa: E402
from flows.storage.objstore import CLIENT_OPTION  # noqa: E402
from tests.s3server import (  # noqa: E402
    AWS_ENV_TO_UNSET,
    DUMMY_AWS_ENV,
    DUMMY_KEY,
    DUMMY_SECRET,
    REGION,
    MotoServer,
    RcloneServer,
    create_bucket,
    upload_dir,
)

Server = MotoServer | RcloneServer
CLIENTS = ("obstore", "s3fs")

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


def server_cpu(server: Server) -> float:
    """CPU seconds the server process has used so far (0 where /proc is missing)."""
    try:
        with open(f"/proc/{server.proc.pid}/stat") as f:  # type: ignore[union-attr]
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run: Callable[[], int], server: Server | None) -> tuple[float, int, float, float]:
    """``run()`` (returns a count): seconds, count, CPU seconds of this process and of the server."""
    wall, cpu = time.perf_counter(), time.process_time()
    served = server_cpu(server) if server else 0.0
    count = run()
    return (time.perf_counter() - wall, count, time.process_time() - cpu,
            (server_cpu(server) - served) if server else 0.0)


def with_client(options: dict[str, Any], client: str) -> dict[str, Any]:
    return {**options, CLIENT_OPTION: client}


def throughput(local: Path, targets: dict[str, tuple[Server, str]], workers: list[int],
               repeats: int) -> None:
    """One epoch per (source, client, workers), ``repeats`` rounds (every configuration once per
    round, so that the load of a shared machine hits all alike); medians, and the best configs."""
    def samples(flow: Flow, count: int) -> Callable[[], int]:
        return lambda: sum(len(batch["audio"]) for batch in flow.loader(num_workers=count))

    configs: list[tuple[str, str, Server | None, str, dict | None]] = [
        ("local", "-", None, str(local / "**" / "*.wav"), None)]
    for name, (server, bucket) in targets.items():
        for client in CLIENTS:
            configs.append((name, client, server, f"{bucket}/clips/**/*.wav",
                            with_client(server.storage_options(), client)))
    for _, _, server, url, options in configs:  # warm up: imports, connections, page cache
        measured(samples(audio_flow(url, options), workers[0]), server)
    runs: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    for _ in range(repeats):
        for count in workers:
            for source, client, server, url, options in configs:
                seconds, n, cpu, served = measured(samples(audio_flow(url, options), count), server)
                runs.setdefault((source, client, count), []).append(
                    (n / seconds, 1000 * cpu / n, 1000 * served / n))
    print("| source | client | threads | samples/s | client CPU ms/sample | server CPU ms/sample |\n"
          "|---|---|---:|---:|---:|---:|")
    best: dict[tuple[str, str], tuple[float, int, float]] = {}
    for (source, client, count), values in runs.items():
        rate, cpu_ms, served_ms = (float(np.median(column)) for column in zip(*values, strict=True))
        print(f"| {source} | {client} | {count} | {rate:.0f} | {cpu_ms:.2f} | {served_ms:.2f} |")
        old_rate, old_count, old_cpu = best.get((source, client), (0.0, 0, float("inf")))
        best[source, client] = max((rate, count), (old_rate, old_count)) + (min(cpu_ms, old_cpu),)
    local_rate, local_count, local_cpu = best["local", "-"]
    print(f"\nMedians of {repeats} rounds. Best local: {local_rate:.0f} samples/s ({local_count} "
          f"threads); lowest client CPU {local_cpu:.2f} ms/sample.\n")
    print("| server | client | best S3 config / best local config | client CPU per sample, local / S3 |")
    print("|---|---|---:|---:|")
    for (source, client), (rate, count, cpu_ms) in best.items():
        if source != "local":
            print(f"| {source} | {client} | **{rate / local_rate:.2f}** ({count} threads) | "
                  f"{local_cpu / cpu_ms:.2f} |")
    print()


def readers(server: Server, root: str, sizes: dict[str, int]) -> dict[str, Callable[[str], Any]]:
    """Whole-object readers of ``root/key`` (``root`` = bucket/prefix), one per client."""
    found: dict[str, Callable[[str], Any]] = {}
    s3fs = fsspec.filesystem("s3", **server.storage_options(), skip_instance_cache=True)
    found["s3fs cat_file"] = lambda k: s3fs.cat_file(f"{root}/{k}")
    try:
        from obstore.fsspec import FsspecStore

        adapter = FsspecStore("s3", endpoint=server.endpoint_url, region=REGION, access_key_id=DUMMY_KEY,
                              secret_access_key=DUMMY_SECRET, client_options={"allow_http": True})
        found["obstore fsspec adapter cat_file"] = lambda k: adapter.cat_file(f"{root}/{k}")
    except ImportError:
        pass
    options = with_client(server.storage_options(), "obstore")
    found["flows.io read_bytes (obstore)"] = lambda k: fio.read_bytes(f"s3://{root}/{k}", options,
                                                                      size=sizes[k])
    try:
        from s3torchconnector._s3client import S3Client, S3ClientConfig

        client = S3Client(REGION, endpoint=server.endpoint_url,
                          s3client_config=S3ClientConfig(force_path_style=True))
        bucket, prefix = root.split("/", 1)
        found["s3torchconnector get_object"] = lambda k: client.get_object(bucket, f"{prefix}/{k}").read()
    except ImportError:
        pass
    return found


def per_get(targets: dict[str, tuple[Server, str]], local: Path, gets: int) -> None:
    """Sequential whole GETs of the clips: client CPU and server CPU per GET, per client."""
    keys = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.wav"))
    keys = (keys * (gets // len(keys) + 1))[:gets]
    sizes = {k: (local / k).stat().st_size for k in keys}
    print(f"| server | client ({gets} sequential GETs, mean {np.mean(list(sizes.values())) / 1024:.0f} "
          "KiB) | client CPU ms/GET | server CPU ms/GET | GETs/s |")
    print("|---|---|---:|---:|---:|")
    for name, (server, bucket) in targets.items():
        root = f"{bucket.removeprefix('s3://')}/clips"
        for label, read in readers(server, root, sizes).items():
            try:
                read(keys[0])  # connect, warm up
                seconds, n, cpu, served = measured(lambda r=read: sum(1 for k in keys if r(k)), server)
                print(f"| {name} | {label} | {1000 * cpu / n:.2f} | {1000 * served / n:.2f} | "
                      f"{n / seconds:.0f} |")
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"| {name} | {label} | failed: {type(error).__name__}: {str(error)[:120]} | | |")
    print()


def tiny_names(count: int) -> list[str]:
    return [f"tiny/d{i % 100:02d}/t{i:05d}.wav" for i in range(count)]


def write_tiny(root: Path, count: int) -> None:
    """``count`` tiny WAVs under ``root/tiny/``."""
    blob = tiny_wav()
    for name in tiny_names(count):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)


def best_of(runs: int, call: Callable[[], Any]) -> float:
    """The shortest wall time of ``runs`` calls."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def time_to_first_batch(root: Path, targets: dict[str, tuple[Server, str]], count: int,
                        moto_count: int) -> None:
    """``count`` tiny WAVs under one prefix (on rclone: in its directory from the start; on moto,
    ``moto_count`` of them uploaded now: moto takes ~25 ms per PUT): list + build, then the first
    batch; per client."""
    started = time.perf_counter()
    moto, bucket = targets["moto"]
    fs = fsspec.filesystem("s3", **moto.storage_options())
    blob = tiny_wav()
    fs.pipe({f"{bucket.removeprefix('s3://')}/{n}": blob for n in tiny_names(moto_count)}, batch_size=64)
    print(f"{moto_count} tiny files uploaded to moto in {time.perf_counter() - started:.1f} s")
    print(f"\n| tiny files | source | client | list + build the flow (server CPU) | then first batch "
          f"of {BATCH} | obstore's own listing, best of 3 | flows' overhead per object over it |")
    print("|---:|---|---|---:|---:|---:|---:|")
    runs: list[tuple[str, str, str, dict | None]] = [("local", "-", str(root / "tiny"), None)]
    runs += [(name, client, f"{bucket}/tiny", with_client(server.storage_options(), client))
             for name, (server, bucket) in targets.items() for client in CLIENTS]
    servers = {name: server for name, (server, _) in targets.items()}
    for source, client, url, opts in runs:
        served = server_cpu(servers[source]) if source in servers else 0.0
        started = time.perf_counter()
        flow = Flow.files(url, extensions=[".wav"], storage_options=opts).read().decode_audio()
        loader = flow.batch(BATCH).loader(num_workers=8)
        built = time.perf_counter()
        served = server_cpu(servers[source]) - served if source in servers else 0.0
        next(iter(loader))
        first = time.perf_counter()
        overhead = raw_listing = ""
        if client == "obstore":
            import obstore

            store = fio.objstore.s3_store(url, opts)
            assert store is not None
            raw = best_of(3, lambda s=store[0]: [c.num_rows for c in obstore.list(
                s, "tiny/", chunk_size=1000, return_arrow=True)])
            ours = best_of(3, lambda u=url, o=opts: fio.list_files_with_sizes(u, [".wav"], storage_options=o))
            overhead = f"{1000 * (ours - raw) / len(flow.source):.3f} ms"  # type: ignore[arg-type]
            raw_listing = f"{raw:.2f} s"
        print(f"| {len(flow.source)} | {source} | {client} | {built - started:.2f} s ({served:.2f} s) | "  # type: ignore[arg-type]
              f"{first - built:.2f} s | {raw_listing} | {overhead} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=150, help="audio clips in the throughput test")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the throughput table")
    parser.add_argument("--gets", type=int, default=300, help="sequential GETs per client")
    parser.add_argument("--tiny", type=int, default=10_000, help="tiny files in the first-batch test")
    parser.add_argument("--tiny-moto", type=int, default=2_000, help="of them, uploaded to moto too")
    args = parser.parse_args()
    for name in AWS_ENV_TO_UNSET:  # never reach real AWS
        os.environ.pop(name, None)
    os.environ.update(DUMMY_AWS_ENV)

    with tempfile.TemporaryDirectory(prefix="flows-bench-") as tmp:
        local, served = Path(tmp) / "clips", Path(tmp) / "rclone"
        started = time.perf_counter()
        size = make_clips(local, args.clips)
        write_tiny(Path(tmp), args.tiny)
        shutil.copytree(Path(tmp) / "tiny", served / "flows-bench" / "tiny")  # a bucket directory
        with RcloneServer(root=served) as rclone, MotoServer() as moto:
            targets: dict[str, tuple[Server, str]] = {"rclone": (rclone, "s3://flows-bench")}
            upload_dir(local, "s3://flows-bench/clips", rclone.storage_options())
            moto_bucket = create_bucket("flows-bench", moto.storage_options())
            upload_dir(local, f"{moto_bucket}/clips", moto.storage_options())
            targets["moto"] = (moto, moto_bucket)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"{args.clips} clips, {size / 2**20:.1f} MiB, written and uploaded to rclone and moto "
                  f"in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, load average {load}\n")
            throughput(local, targets, args.workers, args.repeats)
            per_get(targets, local, args.gets)
            time_to_first_batch(Path(tmp), targets, args.tiny, min(args.tiny, args.tiny_moto))


if __name__ == "__main__":
    main()
