"""flows against the field, on identical work: decode -> mono -> 16 kHz -> 4 s -> batches of 64.

Run ``benchmarks/run.sh`` (it builds ``benchmarks/.venv`` with lhotse and Hugging Face datasets
first). It writes the datasets under ``benchmarks/_data``, measures every loader in a fresh
child process (one at a time), and writes ``benchmarks/results.json`` and
``benchmarks/results.md``. ``--quick`` runs a small smoke version.

Contenders, each on the same files, shuffled, 2+ epochs:
- ``flows``: the best configuration for this machine (workers x threads/processes, measured);
  ``flows + cache``: the same with ``.cache()`` after the deterministic stages;
- ``hand-written``: the seed tutorial's Dataset done correctly (soundfile, downmix, soxr HQ
  resampling, pad/trim) in ``torch.utils.data.DataLoader`` with the best number of workers;
- ``lhotse``: CutSet of the recordings, resample/truncate/pad cuts, ``collate_audio`` with a
  ``SimpleCutSampler`` inside a DataLoader;
- ``HF datasets``: a Dataset of paths cast to ``Audio(sampling_rate=16000, mono=True)`` (soundfile +
  librosa soxr_hq resampling) inside a DataLoader;
- ``SPDL``: an SPDL pipeline of FFmpeg decoding and filtering (mono, soxr at HQ precision, 4 s)
  in its best number of threads (needs FFmpeg's libraries: ``run.sh`` installs them with apt);
- ``kernel limit``: decode + downmix + resample + pad of in-memory bytes in a tight loop; its
  CPU time divided by the cores is the best any loader can do.

Each loader's CPU seconds per 1,000 samples are split into the parent process and the workers
(flows' worker threads, and every worker process); flows' 1 and 2 thread-worker runs are shown
side by side (the scaling with cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import soxr
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
RATE, SECONDS, BATCH = 16_000, 4, 64
FRAMES = RATE * SECONDS
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- datasets ---------------------------------------------------------------------------------


def build_datasets(quick: bool) -> dict[str, dict[str, Any]]:
    """Write (once) the three datasets; return name -> {root, paths, seconds}."""
    from recipes.synthetic import make_sousa, make_urbansound8k, make_yesno

    sizes = {"urbansound8k": 6 if quick else 50, "sousa": 40 if quick else 320, "yesno": 20 if quick else 60}
    yesno_copies = 2 if quick else 10  # YESNO has 60 clips: 10 copies make an epoch 10 batches
    tag = "quick" if quick else "full"
    out = {}
    for name, size in sizes.items():
        root = DATA / f"{name}-{tag}"
        if not (root / ".done").exists():
            print(f"writing {name} ({root})", flush=True)
            if name == "urbansound8k":
                make_urbansound8k(root, clips_per_fold=size)
            elif name == "sousa":
                make_sousa(root, n_samples=size)
            else:
                clips = make_yesno(root / "copy0", n_files=size)
                for k in range(1, yesno_copies):
                    shutil.copytree(clips, root / f"copy{k}" / clips.name)
            (root / ".done").touch()
        if name == "sousa":
            table = pq.read_table(root / "labels" / "samples.parquet", columns=["audio_path"])
            paths = [str(root / p) for p in table.column("audio_path").to_pylist()]
        else:
            paths = sorted(str(p) for p in root.rglob("*.wav"))
        seconds = sum(soundfile.info(p).duration for p in paths)
        out[name] = {"root": str(root), "paths": paths, "seconds": seconds}
    return out


def warm_page_cache(paths: list[str]) -> None:
    for p in paths:
        Path(p).read_bytes()


# ---- the loaders --------------------------------------------------------------------------------


def flows_flow(ds: dict) -> Any:
    """flows' pipeline for ``ds``, up to the batching."""
    from flows import Flow

    root = Path(ds["root"])
    if (root / "labels" / "samples.parquet").exists():  # SOUSA: FLAC files with Parquet labels
        flow = Flow.table(str(root / "labels" / "samples.parquet"),
                          columns=["sample_id", "skill_tier", "audio_path"],
                          path_column="audio_path", root=str(root))
    else:
        flow = Flow.files(ds["root"])
    return flow.shuffle(seed=0).read().decode_audio().downmix().resample(RATE).pad(FRAMES)


def flows_loader(ds: dict, workers: int, method: str, cache: str | None = None) -> Any:
    flow = flows_flow(ds)
    if cache:
        flow = flow.cache(cache)
    return flow.batch(BATCH).loader(num_workers=workers, method=method)  # type: ignore[arg-type]


class ClipDataset(torch.utils.data.Dataset):
    """The seed tutorial's Dataset done correctly: float32 decode, downmix, a real (anti-aliased)
    resampler instead of taking every 5th sample, then pad/trim to 4 s."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        data, rate = soundfile.read(self.paths[index], dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if rate != RATE:
            mono = soxr.resample(mono, rate, RATE, quality="HQ")
        out = np.zeros(FRAMES, dtype=np.float32)
        n = min(len(mono), FRAMES)
        out[:n] = mono[:n]
        return torch.from_numpy(out)[None]


def handwritten_loader(ds: dict, workers: int) -> Any:
    return torch.utils.data.DataLoader(
        ClipDataset(ds["paths"]), batch_size=BATCH, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def lhotse_loader(ds: dict, workers: int) -> Any:
    from lhotse import CutSet, Recording, RecordingSet
    from lhotse.dataset import SimpleCutSampler
    from lhotse.dataset.collation import collate_audio

    class Audio(torch.utils.data.Dataset):
        def __getitem__(self, cuts: CutSet) -> torch.Tensor:
            audio, _ = collate_audio(cuts, mono_downmix=True)
            return audio

    recordings = RecordingSet.from_recordings(Recording.from_file(p) for p in ds["paths"])
    cuts = CutSet.from_manifests(recordings=recordings).resample(RATE)
    cuts = cuts.truncate(max_duration=SECONDS, offset_type="start", preserve_id=True)
    cuts = cuts.pad(duration=SECONDS, preserve_id=True)
    sampler = SimpleCutSampler(cuts, max_cuts=BATCH, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(Audio(), sampler=sampler, batch_size=None, num_workers=workers,
                                       persistent_workers=workers > 0)


def _pad_batch(rows: list[dict]) -> torch.Tensor:
    out = torch.zeros(len(rows), 1, FRAMES)
    for i, row in enumerate(rows):
        audio = torch.as_tensor(row["audio"]["array"], dtype=torch.float32)[:FRAMES]
        out[i, 0, : len(audio)] = audio
    return out


def hf_loader(ds: dict, workers: int) -> Any:
    import datasets

    data = datasets.Dataset.from_dict({"audio": ds["paths"]})
    data = data.cast_column("audio", datasets.Audio(sampling_rate=RATE, mono=True))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       collate_fn=_pad_batch, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


class _Reshuffled:
    """The paths, in a new seeded order on every pass (every epoch)."""

    def __init__(self, paths: list[str]):
        self.paths, self.epoch = paths, 0

    def __iter__(self) -> Any:
        order = np.random.default_rng(self.epoch).permutation(len(self.paths))
        self.epoch += 1
        return (self.paths[i] for i in order)


class _Epochs:
    """Iterating gives one epoch of a started SPDL pipeline."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def __iter__(self) -> Any:
        return self.pipeline.get_iterator()


def spdl_loader(ds: dict, workers: int) -> Any:
    """SPDL: FFmpeg decodes (libspdl demuxes and decodes the file itself, GIL released) and an
    FFmpeg filter downmixes, resamples with soxr at HQ precision (20 bits) and pads/trims, in
    ``workers`` threads; 64 clips are stacked per batch."""
    import spdl.io
    from spdl.pipeline import PipelineBuilder

    steps = (f"aformat=channel_layouts=mono,aresample={RATE}:resampler=soxr:precision=20,apad,"
             f"atrim=end_sample={FRAMES},aformat=sample_fmts=flt")

    def load(path: str) -> torch.Tensor:
        return torch.from_numpy(spdl.io.to_numpy(spdl.io.load_audio(path, filter_desc=steps))).T

    pipeline = (PipelineBuilder().add_source(_Reshuffled(ds["paths"]), continuous=True)
                .pipe(load, concurrency=max(1, workers)).aggregate(BATCH).pipe(torch.stack)
                .add_sink(3).build(num_threads=max(1, workers)))
    pipeline.start()
    return _Epochs(pipeline)


def kernel(ds: dict) -> dict:
    """decode + downmix + resample + pad of in-memory bytes, one core, tight loop."""
    blobs = [Path(p).read_bytes() for p in ds["paths"]]
    start = time.process_time()
    for blob in blobs:
        data, rate = soundfile.read(io.BytesIO(blob), dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if rate != RATE:
            mono = soxr.resample(mono, rate, RATE, quality="HQ")
        out = np.zeros(FRAMES, dtype=np.float32)
        out[: min(len(mono), FRAMES)] = mono[:FRAMES]
    cpu = time.process_time() - start
    return {"cpu_per_sample": cpu / len(blobs), "samples_per_s": CORES * len(blobs) / cpu}


# ---- measuring one loader in a child process ----------------------------------------------------


def _cpu_split() -> tuple[float, float]:
    """(parent, workers) CPU seconds so far: flows' worker threads and every child process
    (live or reaped) count as workers; the rest of this process (the training loop's thread,
    the prefetcher, the sampler, hand-over and collation where it happens there) as the parent."""
    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF)
    worker_ids = {t.native_id for t in threading.enumerate() if t.name.startswith("flows-worker")}
    threads = sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in worker_ids)
    return own.ru_utime + own.ru_stime - threads, _tree_cpu(children_only=True) + threads


def _tree_cpu(children_only: bool = False) -> float:
    """CPU seconds of this process and all its children, live or reaped."""
    import psutil

    me = psutil.Process()
    whose = (resource.RUSAGE_CHILDREN,) if children_only else (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    total = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime for who in whose)
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def child(args: argparse.Namespace) -> None:
    ds = json.loads(Path(args.dataset).read_text())
    started = time.perf_counter()
    if args.contender == "kernel":
        print(json.dumps(kernel(ds)))
        return
    if args.contender == "flows":
        loader = flows_loader(ds, args.workers, args.method, args.cache)
    else:
        build = {"hand-written": handwritten_loader, "lhotse": lhotse_loader, "hf": hf_loader,
                 "spdl": spdl_loader}
        loader = build[args.contender](ds, args.workers)
    setup = time.perf_counter() - started
    epochs = []
    for _ in range(args.epochs):
        cpu0, split0, t0 = _tree_cpu(), _cpu_split(), time.perf_counter()
        first, samples = None, 0
        for batch in loader:
            audio = batch["audio"] if isinstance(batch, dict) else batch
            assert audio.shape[-1] == FRAMES and audio.reshape(len(audio), -1).shape[1] == FRAMES
            samples += len(audio)
            if first is None:
                first = time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        split = _cpu_split()
        epochs.append({"seconds": seconds, "first_batch": first, "samples": samples,
                       "cpu": _tree_cpu() - cpu0, "parent_cpu": split[0] - split0[0],
                       "workers_cpu": split[1] - split0[1]})
    print(json.dumps({"setup": setup, "epochs": epochs}))


class Monitor(threading.Thread):
    """Samples the summed RSS and PSS of a process tree (every 50 ms) until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.rss, self.pss = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.is_set():
            rss = pss = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        info = proc.memory_full_info()
                        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.done.wait(0.05)


def measure(contender: str, ds_file: Path, workers: int = 0, method: str = "thread",
            epochs: int = 3, cache: str | None = None, mode: str = "child",
            extra: list[str] | None = None) -> dict:
    """Run one measurement in a fresh child process; add its peak memory."""
    cmd = [sys.executable, str(Path(__file__)), mode, contender, str(ds_file), "--workers", str(workers),
           "--method", method, "--epochs", str(epochs), *(["--cache", cache] if cache else []),
           *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
    monitor = Monitor(proc.pid)
    monitor.start()
    out, err = proc.communicate()
    monitor.done.set()
    monitor.join()
    if proc.returncode:
        sys.stderr.write(err)
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{contender} failed with {proc.returncode}: {last}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mb=monitor.rss / 2**20, peak_pss_mb=monitor.pss / 2**20)
    return result


def summarize(result: dict, seconds_per_sample: float, epochs: slice) -> dict:
    """Throughput over the chosen epochs, first-batch time of the first of them, CPU use."""
    chosen = result["epochs"][epochs]
    samples = sum(e["samples"] for e in chosen)
    wall = sum(e["seconds"] for e in chosen)
    cpu = sum(e["cpu"] for e in chosen)
    per_1k = 1000 / samples
    return {"samples_per_s": samples / wall, "audio_s_per_s": samples * seconds_per_sample / wall,
            "first_batch_s": chosen[0]["first_batch"], "cpu_util": cpu / (wall * CORES),
            "parent_cpu_per_1k": per_1k * sum(e.get("parent_cpu", 0.0) for e in chosen),
            "workers_cpu_per_1k": per_1k * sum(e.get("workers_cpu", 0.0) for e in chosen),
            "peak_rss_mb": result["peak_rss_mb"], "peak_pss_mb": result["peak_pss_mb"],
            "setup_s": result.get("setup", 0.0)}


# ---- the comparison -------------------------------------------------------------------------------


def best_config(contender: str, configs: list[tuple[int, str]], ds_file: Path, per_sample: float,
                epochs: int) -> tuple[dict, str, list]:
    """Measure ``contender`` in each (workers, method) configuration; return the fastest."""
    tried = []
    for workers, method in configs:
        s = summarize(measure(contender, ds_file, workers, method, epochs), per_sample, slice(1, None))
        tried.append({"workers": workers, "method": method, **s})
        print(f"{contender} {workers} {method}: {s['samples_per_s']:.0f} samples/s", flush=True)
    top = max(tried, key=lambda t: t["samples_per_s"])
    return top, f"{top['workers']} {top['method']} workers", tried


def thread_scaling(tried: list[dict]) -> dict:
    """flows' samples/s with 1 and 2 thread workers, from its sweep, and their ratio."""
    rate = {t["workers"]: t["samples_per_s"] for t in tried if t["method"] == "thread"}
    return {"1": rate.get(1), "2": rate.get(2),
            "ratio": rate[2] / rate[1] if rate.get(1) and rate.get(2) else None}


def compare(datasets: dict, quick: bool) -> dict:
    results: dict[str, Any] = {}
    worker_choices = [1, 2] if quick else sorted({1, 2, CORES, 2 * CORES})
    epochs = 2 if quick else 3
    for name, ds in datasets.items():
        print(f"\n== {name}: {len(ds['paths'])} clips, {ds['seconds']:.0f} s of audio", flush=True)
        ds_file = DATA / f"{name}.json"
        ds_file.write_text(json.dumps(ds))
        warm_page_cache(ds["paths"])
        per_sample = ds["seconds"] / len(ds["paths"])
        rows: dict[str, dict] = {}
        steady = slice(1, None)  # epochs after the first: workers started, page cache warm

        k = measure("kernel", ds_file)
        rows["kernel limit"] = {"samples_per_s": k["samples_per_s"],
                                "audio_s_per_s": k["samples_per_s"] * per_sample,
                                "config": f"{1e3 * k['cpu_per_sample']:.2f} ms CPU/sample x {CORES} cores"}
        print(f"kernel limit: {k['samples_per_s']:.0f} samples/s", flush=True)

        flows_configs = [(w, m) for w in worker_choices for m in ("thread", "process")]
        top, config, tried = best_config("flows", flows_configs, ds_file, per_sample, epochs)
        rows["flows"] = {**top, "config": config}
        results.setdefault("sweeps", {})[name] = {"flows": tried}
        results.setdefault("thread_scaling", {})[name] = thread_scaling(tried)
        workers, method = top["workers"], top["method"]

        cache_dir = DATA / "cache" / name
        import shutil

        cached = []  # the best first-epoch configuration, and inline (reading the cache is cheap)
        for w, m in dict.fromkeys([(workers, method), (0, "thread")]):
            shutil.rmtree(cache_dir, ignore_errors=True)
            r = measure("flows", ds_file, w, m, epochs, cache=str(cache_dir))
            label = f"{w} {m} workers"
            cached.append((summarize(r, per_sample, steady)["samples_per_s"], label, r))
            print(f"flows + cache {label}: {cached[-1][0]:.0f} samples/s", flush=True)
        _, label, r = max(cached, key=lambda c: c[0])
        rows["flows + cache, epoch 1"] = {**summarize(r, per_sample, slice(0, 1)), "config": label}
        rows["flows + cache, later epochs"] = {**summarize(r, per_sample, steady), "config": label}

        top, config, tried = best_config("hand-written", [(w, "process") for w in worker_choices], ds_file,
                                         per_sample, epochs)
        rows["hand-written DataLoader"] = {**top, "config": config}
        results["sweeps"][name]["hand-written"] = tried
        for contender, label in (("lhotse", "lhotse"), ("hf", "HF datasets")):
            try:
                top, config, tried = best_config(contender, [(w, "process") for w in worker_choices],
                                                 ds_file, per_sample, epochs)
                rows[label] = {**top, "config": config}
                results["sweeps"][name][contender] = tried
            except RuntimeError as error:
                rows[label] = {"error": str(error)}
        try:  # SPDL runs its own thread pool: its best thread count
            top, config, tried = best_config("spdl", [(w, "thread") for w in worker_choices], ds_file,
                                             per_sample, epochs)
            rows["SPDL"] = {**top, "config": config}
            results["sweeps"][name]["spdl"] = tried
        except RuntimeError as error:
            rows["SPDL"] = {"error": str(error)}
        results[name] = rows
    return results


# ---- resume cost and Parquet memory ----------------------------------------------------------------


def _table(path: Path, rows: int) -> Path:
    if not path.exists():
        ids = np.arange(rows)
        table = pa.table({"id": ids, "label": ids % 10, "value": ids * 0.5,
                          "path": [f"clips/{i:07d}.wav" for i in ids]})
        pq.write_table(table, path, row_group_size=1024)
    return path


def _with_tensor(record: dict) -> dict:
    return {**record, "x": torch.full((16,), float(record["value"]))}


def resume_child(args: argparse.Namespace) -> None:
    """Time to the first batch: fresh, and restored at 10/50/90% of an epoch."""
    from flows import Flow
    from flows.testing import assert_same

    rows = int(args.contender)
    path = _table(DATA / f"table-{rows}.parquet", rows)

    def build() -> Any:  # a fresh Flow (and Parquet reader) per loader, as in a new process
        return Flow.table(str(path)).shuffle(seed=0).map(_with_tensor).batch(BATCH)

    flow = build()

    def first_batch(state: dict | None) -> tuple[float, Any]:
        loader = build().loader(num_workers=args.workers, method=args.method)
        start = time.perf_counter()
        if state is not None:
            loader.load_state_dict(state)
        batch = next(iter(loader))
        return time.perf_counter() - start, batch

    fresh = statistics.median(first_batch(None)[0] for _ in range(11))
    out: dict[str, Any] = {"rows": rows, "fresh_s": fresh, "restored_s": {}}
    batches = len(flow.loader())
    reference = flow.loader(num_workers=args.workers, method=args.method)
    states, expected = {}, {}
    wanted = {round(f * batches): f for f in (0.1, 0.5, 0.9)}
    for i, batch in enumerate(reference, 1):
        if i in wanted:
            states[wanted[i]] = reference.state_dict()
        if i - 1 in wanted:
            expected[wanted[i - 1]] = batch
    for fraction, state in states.items():
        times = []
        for _ in range(11):
            seconds, batch = first_batch(state)
            times.append(seconds)
        assert_same(batch, expected[fraction], "restored batch")
        out["restored_s"][str(fraction)] = statistics.median(times)
    print(json.dumps(out))


def _parquet_audio(small: Path, large: Path, rows: int) -> None:
    """A HF-layout Parquet with embedded FLAC bytes, and a 10x larger copy (same row groups)."""
    if small.exists() and large.exists():
        return
    from recipes.synthetic import make_sousa_hf

    root = make_sousa_hf(DATA / f"sousa-hf-{rows}", n_samples=rows)
    shards = [pq.read_table(p) for p in sorted((root / "data").glob("*.parquet"))]
    table = pa.concat_tables(shards).select(["sample_id", "skill_tier", "audio"])
    pq.write_table(table, small, row_group_size=16)
    copies = []
    for k in range(10):
        ids = pa.array([f"{s}-{k}" for s in table.column("sample_id").to_pylist()])
        copies.append(table.set_column(0, "sample_id", ids))
    pq.write_table(pa.concat_tables(copies), large, row_group_size=16)


def memory_child(args: argparse.Namespace) -> None:
    """Stream one epoch of a Parquet file with embedded audio; report peak RSS (this process)."""
    from flows import Flow

    loader = (Flow.table(args.contender, columns=["sample_id", "skill_tier", "audio"]).shuffle(seed=0)
              .decode_audio(field="audio").downmix().resample(RATE).pad(FRAMES).batch(BATCH)
              .loader(num_workers=args.workers, method=args.method))
    samples = sum(len(batch["audio"]) for batch in loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": samples, "ru_maxrss_mb": peak, "epochs": [], "setup": 0.0}))


def extras(quick: bool, workers: int, method: str) -> dict:
    out: dict[str, Any] = {"resume": [], "memory": {}}
    for rows in (1_000, 10_000) if quick else (1_000, 100_000):
        r = measure(str(rows), DATA / "none", workers, method, mode="resume")
        out["resume"].append(r)
        print(f"resume {rows}: fresh {r['fresh_s']:.3f} s, restored {r['restored_s']}", flush=True)
    # the 1x file is long enough (10 batches) for the pipeline to reach its steady state
    rows = 128 if quick else 640
    small, large = DATA / f"audio-{rows}-1x.parquet", DATA / f"audio-{rows}-10x.parquet"
    _parquet_audio(small, large, rows)
    for label, path in (("1x", small), ("10x", large)):
        r = measure(str(path), DATA / "none", workers, method, mode="memory")
        r["file_mb"] = path.stat().st_size / 2**20
        out["memory"][label] = r
        print(f"parquet {label}: {r['file_mb']:.0f} MB file, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)
    return out


# ---- report -------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{cpu}, {CORES} cores available, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}; "
            f"load average at the end {load:.1f} (the machine is shared)")


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _cell(row: dict, base: dict, key: str, fmt: str) -> str:
    """A figure and its ratio to flows' (blank when not measured)."""
    if key not in row:
        return ""
    return fmt.format(row[key]) + _ratio(row[key], base.get(key))


def markdown(results: dict, datasets: dict) -> str:
    lines = [f"Machine: {results['machine']}", "",
             f"Command: `{results['command']}`", ""]
    for name, rows in results["comparison"].items():
        if name in ("sweeps", "thread_scaling"):
            continue
        ds = datasets[name]
        lines += [f"### {name}: {len(ds['paths'])} clips, {ds['seconds']:.0f} s of audio", "",
                  "| loader | config | samples/s | audio s/s | first batch s | peak RSS MB "
                  "(PSS) | CPU use | CPU s / 1k samples: parent, workers |",
                  "|---|---|---|---|---|---|---|---|"]
        base = rows["flows"]
        for label, row in rows.items():
            if "error" in row:
                lines.append(f"| {label} | failed: {row['error'][:80]} | | | | | | |")
                continue
            sps = _cell(row, base, "samples_per_s", "{:.0f}")
            aps = _cell(row, base, "audio_s_per_s", "{:.0f}")
            first = _cell(row, base, "first_batch_s", "{:.2f}")
            rss = "" if "peak_rss_mb" not in row else \
                f"{row['peak_rss_mb']:.0f} ({_cell(row, base, 'peak_pss_mb', '{:.0f}')})"
            cpu = _cell({k: 100 * v for k, v in row.items() if k == "cpu_util"},
                        {"cpu_util": 100 * base["cpu_util"]}, "cpu_util", "{:.0f}%")
            split = "" if "parent_cpu_per_1k" not in row else \
                f"{row['parent_cpu_per_1k']:.2f}, {row['workers_cpu_per_1k']:.2f}"
            lines.append(f"| {label} | {row['config']} | {sps} | {aps} | {first} | {rss} | {cpu} | {split} |")
        scaling = results["comparison"].get("thread_scaling", {}).get(name)
        if scaling and scaling["ratio"]:
            lines += ["", f"flows with thread workers: 1 thread {scaling['1']:.0f} samples/s, 2 threads "
                      f"{scaling['2']:.0f} samples/s ({scaling['ratio']:.2f}x on {CORES} cores)"]
        lines.append("")
    extra = results.get("extras")
    if extra:
        lines += ["### Resume: time to the first batch", "",
                  "| rows | fresh start s | restored at 10% | 50% | 90% |", "|---|---|---|---|---|"]
        for r in extra["resume"]:
            f = r["fresh_s"]
            cells = [f"{r['restored_s'][k]:.3f}{_ratio(r['restored_s'][k], f)}"
                     for k in ("0.1", "0.5", "0.9")]
            lines.append(f"| {r['rows']:,} | {f:.3f} | " + " | ".join(cells) + " |")
        lines += ["", "### Memory: streaming Parquet with embedded audio (one epoch)", "",
                  "| file | size MB | peak RSS MB (tree) | peak PSS MB | ru_maxrss MB |",
                  "|---|---|---|---|---|"]
        small = extra["memory"]["1x"]
        for label, r in extra["memory"].items():
            lines.append(f"| {label} | {r['file_mb']:.0f} | {r['peak_rss_mb']:.0f}"
                         f"{_ratio(r['peak_rss_mb'], small['peak_rss_mb'])} | {r['peak_pss_mb']:.0f} | "
                         f"{r['ru_maxrss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "child", "resume", "memory"])
    parser.add_argument("contender", nargs="?")
    parser.add_argument("dataset", nargs="?")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--method", default="thread")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache")
    parser.add_argument("--quick", action="store_true", help="small datasets, fewer configurations")
    parser.add_argument("--skip-comparison", action="store_true")
    args = parser.parse_args()
    if args.mode != "all":
        {"child": child, "resume": resume_child, "memory": memory_child}[args.mode](args)
        sys.stdout.flush()
        os._exit(0)  # loaders left mid-epoch still have daemon threads: skip interpreter teardown

    DATA.mkdir(parents=True, exist_ok=True)
    datasets = build_datasets(args.quick)
    results: dict[str, Any] = {"command": "benchmarks/run.sh" + (" --quick" if args.quick else "")}
    results["comparison"] = {} if args.skip_comparison else compare(datasets, args.quick)
    best = results["comparison"].get("urbansound8k", {}).get("flows", {"workers": 2, "method": "thread"})
    results["extras"] = extras(args.quick, best["workers"], best["method"])
    results["machine"] = machine()
    suffix = "-quick" if args.quick else ""
    (HERE / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, datasets)
    (HERE / f"results{suffix}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
