"""Flows end to end from S3: a real moto server in a subprocess (tests/s3server.py), optionally
behind a FaultProxy that answers 500/503/SlowDown, resets connections and truncates bodies; the
fault test runs against ``rclone serve s3`` too. Every test runs with both S3 clients of flows.storage.io
(obstore, the default, and s3fs).

Every recipe run from ``s3://`` gives the same batches as from local disk; checkpoints written to
``s3://`` resume exactly; an epoch through 10% faulted requests equals a fault-free one; missing
and forbidden objects fail fast; the listing happens once per build, whatever the workers or
ranks; Parquet row groups are streamed with range reads; credentials never show.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import fsspec.config
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import soundfile as sf
import torch

from flows import Flow
from flows.errors import FlowsError, StageError
from flows.sources.items import Items
from flows.storage import io as fio
from flows.testing import assert_same
from flows.training.checkpoint import CheckpointManager
from flows.training.recipe import REGISTRY, Recipe, make_config
from flows.training.train import TrainConfig, train
from recipes.folder import Folder
from recipes.sousa import Sousa
from recipes.table import TableRecipe
from recipes.tensor_folder import TensorFolder
from recipes.urbansound8k import UrbanSound8K
from recipes.yesno import YesNo
from tests.s3server import FAULT_KINDS, free_port, upload_dir

pytestmark = pytest.mark.usefixtures("s3_client")  # each test with obstore and with s3fs

# --------------------------------------------------------------------------- helpers


def write_wavs(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` short WAVs of assorted rates, channels, subtypes and lengths in nested folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        rate = int(rng.choice([8_000, 16_000, 22_050, 44_100]))
        channels = 1 + i % 2
        audio = 0.3 * rng.standard_normal((int(rate * rng.uniform(0.05, 0.3)), channels))
        path = root / f"d{i % 3}" / f"clip-{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, rate, subtype=["PCM_16", "PCM_24", "FLOAT"][i % 3])
    return root


def audio_chain(flow: Flow, retries: int = 5, check: Callable | None = None) -> Flow:
    """read -> (check) -> decode -> downmix -> resample 16 kHz -> pad -> batch."""
    flow = flow.read(retries=retries)
    if check is not None:
        flow = flow.map(check)
    return flow.decode_audio().downmix().resample(16_000).pad(4_000).batch(5)


def epoch(flow: Flow, workers: int = 0, **options: Any) -> list[Any]:
    return list(flow.loader(num_workers=workers, **options))


def localized(value: Any, remote: str, local: str) -> Any:
    """``value`` with the remote root in every string replaced by the local one."""
    if isinstance(value, str):
        return value.replace(remote, local)
    if isinstance(value, dict):
        return {k: localized(v, remote, local) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(localized(v, remote, local) for v in value)
    return value


def urls_source(urls: list[str]) -> Items:
    """A source of ``{path, key}`` records for these URLs."""
    return Items([{"path": u, "key": u.rsplit("/", 1)[-1]} for u in urls])


def lists(proxy: Any, bucket: str) -> int:
    """ListObjects requests the proxy saw on ``bucket`` (a GET on the bucket itself)."""
    name = bucket.removeprefix("s3://")
    return proxy.count("GET", name) + proxy.count("GET", name + "/")


@pytest.fixture
def prefix(s3_bucket: str) -> str:
    """A unique prefix in the session bucket."""
    return f"{s3_bucket}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def clips(s3_bucket: str, s3_options: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """24 small WAVs, on local disk and uploaded: ``(local root, s3 root)``."""
    local = write_wavs(tmp_path_factory.mktemp("clips"), 24)
    remote = f"{s3_bucket}/clips-{uuid.uuid4().hex[:8]}"
    upload_dir(local, remote, s3_options)
    return local, remote


# --------------------------------------------------------------------------- listing


def test_files_listed_from_s3_like_from_local(clips, s3_options):
    local, remote = clips
    for pattern in ("**/*.wav", "d1/*.wav"):
        from_s3 = Flow.files(f"{remote}/{pattern}", storage_options=s3_options).source
        from_disk = Flow.files(str(local / pattern)).source
        assert from_s3 is not None and from_disk is not None
        assert [from_s3.key(i) for i in range(len(from_s3))] == [
            from_disk.key(i) for i in range(len(from_disk))]
        assert all(from_s3[i]["path"].startswith(remote + "/") for i in range(len(from_s3)))
    whole = Flow.files(remote, storage_options=s3_options).source  # a bare prefix recurses
    assert whole is not None and len(whole) == 24 and whole.key(0) == "d0/clip-000.wav"


def test_listed_once_per_build_even_with_process_workers(clips, fault_proxy):
    """Workers never list; and with the sizes from the listing, forked workers read each file
    with a single GET (no HEAD)."""
    local, remote = clips
    bucket = remote.rsplit("/", 1)[0]
    proxy = fault_proxy(rate=0.0)
    flow = Flow.files(f"{remote}/**/*.wav", storage_options=proxy.storage_options())
    assert lists(proxy, bucket) == 1
    proxy.reset_counts()
    loader = audio_chain(flow).loader(num_workers=4, method="process")
    first, second = list(loader), list(loader)
    assert lists(proxy, bucket) == 0
    assert proxy.count("HEAD") == 0
    assert proxy.count("GET") == 2 * 24
    assert_same(first, second)
    assert_same(localized(first, remote, str(local)),
                epoch(audio_chain(Flow.files(str(local / "**" / "*.wav")))))


def _rank_main(rank: int, url: str, options: dict, port: int, results: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        source = Flow.files(url, storage_options=options).source
        assert source is not None
        paths = [source[i]["path"] for i in range(len(source))]
        data = fio.read_bytes(paths[rank], options)
        results.put((rank, paths, len(data)))
    except BaseException as error:  # report, don't hang the parent
        results.put((rank, repr(error), 0))
    finally:
        dist.destroy_process_group()


def test_listed_once_across_ranks(clips, fault_proxy):
    """Under torch.distributed rank 0 lists and broadcasts URLs and sizes: one listing in all,
    and the other rank reads with a single GET too."""
    _, remote = clips
    proxy = fault_proxy(rate=0.0)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank_main,
                             args=(r, f"{remote}/**/*.wav", proxy.storage_options(), port, results))
             for r in range(2)]
    for process in ranks:
        process.start()
    outcome = dict((rank, (paths, size)) for rank, paths, size in (results.get(timeout=60) for _ in ranks))
    for process in ranks:
        process.join(30)
        assert process.exitcode == 0
    assert isinstance(outcome[0][0], list), outcome[0][0]
    assert outcome[0][0] == outcome[1][0] and len(outcome[0][0]) == 24
    assert lists(proxy, remote.rsplit("/", 1)[0]) == 1
    assert proxy.count("HEAD") == 0 and proxy.count("GET") == 1 + 2


# --------------------------------------------------------------------------- every recipe


RECIPES: dict[str, tuple[type[Recipe], Callable[[Path], Any], dict[str, Any]]] = {
    "yesno": (YesNo, lambda root: YesNo.generate(root, n_files=15), {}),
    "urbansound8k": (UrbanSound8K, lambda root: UrbanSound8K.generate(root, clips_per_fold=1),
                     {"batch_size": 3}),
    "sousa": (Sousa, lambda root: Sousa.generate(root, n_samples=12), {"batch_size": 3}),
    "sousa-hf": (Sousa, lambda root: Sousa.generate(root, n_samples=12, layout="hf"),
                 {"batch_size": 3}),
    "tensor_folder": (TensorFolder, lambda root: TensorFolder.generate(root, n_samples=20),
                      {"batch_size": 4}),
    "folder": (Folder, lambda root: Folder.generate(root, clips_per_class=2, classes=3),
               {"batch_size": 2}),
    "table": (TableRecipe, lambda root: TableRecipe.generate(root, clips_per_fold=1),
              {"batch_size": 4, "split_column": "split"}),
}


def test_every_registered_recipe_is_covered():
    assert set(REGISTRY) <= {cls.name for cls, _, _ in RECIPES.values()}


@pytest.fixture(scope="module")
def recipe_data(s3_bucket: str, s3_options: dict,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each recipe's synthetic dataset on local disk and uploaded: ``{name: (local, s3 url)}``."""
    root = f"{s3_bucket}/recipes-{uuid.uuid4().hex[:8]}"
    data = {}
    for name, (_, generate, _) in RECIPES.items():
        local = tmp_path_factory.mktemp(name)
        generate(local)
        upload_dir(local, f"{root}/{name}", s3_options)
        data[name] = (local, f"{root}/{name}")
    return data


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_from_s3_equals_local(name, recipe_data, s3_options):
    cls, _, options = RECIPES[name]
    local, remote = recipe_data[name]
    from_disk = cls(make_config(cls, data_dir=str(local), **options))
    from_s3 = cls(make_config(cls, data_dir=remote, storage_options=s3_options, **options))
    for part in ("train_flow", "eval_flow"):
        expected = epoch(getattr(from_disk, part)())
        got = epoch(getattr(from_s3, part)(), workers=3)
        assert expected, f"{name}.{part} is empty"
        assert_same(localized(got, remote, str(local)), expected, f"{name}.{part}")


# --------------------------------------------------------------------------- checkpoints


def test_training_checkpointed_to_s3_resumes_exactly(recipe_data, s3_options, prefix):
    """Data and checkpoints on S3: stopped mid-epoch, resumed from the s3:// checkpoint (with
    another worker count), the parameters equal an uninterrupted run's bit for bit."""
    _, remote = recipe_data["tensor_folder"]

    def recipe(workers: int) -> Recipe:
        config = make_config(TensorFolder, data_dir=remote, storage_options=s3_options,
                             epochs=2, batch_size=4, num_workers=workers)
        return TensorFolder(config)

    directory = f"{prefix}/checkpoints"
    options: dict[str, Any] = dict(progress=False, checkpoint_dir=directory,
                                   checkpoint_storage_options=s3_options)
    reference = train(recipe(0), TrainConfig(progress=False))
    stopped = train(recipe(2), TrainConfig(max_steps=3, **options))
    assert stopped.step == 3 and stopped.epoch == 0
    assert stopped.checkpoint == f"{directory}/ckpt-0000000003.pt"
    assert CheckpointManager(directory, storage_options=s3_options).list() == [stopped.checkpoint]
    done = train(recipe(0), TrainConfig(resume=True, **options))
    assert done.resumed_from == stopped.checkpoint and done.step == reference.step == 8
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, done.model.state_dict()[key]), key


def test_loader_state_round_trip_through_s3(clips, s3_options, prefix):
    _, remote = clips
    flow = audio_chain(Flow.files(f"{remote}/**/*.wav", storage_options=s3_options).shuffle(seed=3))
    expected = epoch(flow)
    loader = flow.loader(num_workers=2)
    it = iter(loader)
    head = [next(it), next(it)]
    manager = CheckpointManager(f"{prefix}/loader", storage_options=s3_options)
    url = manager.save({"loader": loader.state_dict()}, step=2)
    resumed = flow.loader(num_workers=3)
    resumed.load_state_dict(CheckpointManager(f"{prefix}/loader", storage_options=s3_options)
                            .load(url)["loader"])
    assert_same(head + list(resumed), expected)


# --------------------------------------------------------------------------- faults


def test_epoch_through_faults_equals_a_fault_free_run(s3_target, tmp_path, caplog):
    """10% of the requests (listing included) fail in every way the proxy knows; the epoch is
    identical, and the decoder only ever sees complete bodies (on moto and on rclone)."""
    s3_options, prefix = s3_target.options, s3_target.prefix
    caplog.set_level(logging.INFO, logger="flows")
    local = write_wavs(tmp_path / "clips", 90, seed=1)
    # No stored checksum: botocore cannot validate the answers, so a "short" body (consistent
    # but cut Content-Length) is caught by flows' size check alone.
    no_checksum = {**s3_options, "config_kwargs": {"request_checksum_calculation": "when_required"}}
    upload_dir(local, prefix, no_checksum)
    originals = {f"{prefix}/{p.relative_to(local).as_posix()}": p.read_bytes()
                 for p in local.rglob("*.wav")}
    expected = epoch(audio_chain(Flow.files(f"{prefix}/**/*.wav", storage_options=s3_options)))

    decoded: list[str] = []

    def complete(item: dict) -> dict:
        assert item["bytes"] == originals[item["path"]], f"damaged body for {item['path']}"
        decoded.append(item["path"])
        return item

    proxy = s3_target.proxy(rate=0.1, kinds=FAULT_KINDS, seed=5)
    flow = Flow.files(f"{prefix}/**/*.wav", storage_options=proxy.storage_options())
    got = epoch(audio_chain(flow, retries=8, check=complete), workers=4)
    assert_same(got, expected)
    assert sorted(decoded) == sorted(originals)
    assert all(proxy.counts[kind] > 0 for kind in FAULT_KINDS), proxy.counts
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any("TruncatedReadError" in m for m in retried), retried  # the length check fired


@pytest.mark.parametrize("case", ["missing", "forbidden"])
def test_missing_or_forbidden_object_fails_fast_naming_the_url(case, fault_proxy, prefix, s3_options):
    url = f"{prefix}/{case}.wav"
    proxy = fault_proxy(rate=0.0)
    if case == "forbidden":
        fsspec.filesystem("s3", **s3_options).pipe_file(url, b"RIFF")
        proxy.forbid(url)
    flow = Flow.from_source(urls_source([url]), storage_options=proxy.storage_options()).read()
    with pytest.raises(StageError) as info:
        epoch(flow)
    message = str(info.value)
    assert url in message and ("not found" if case == "missing" else "access denied") in message
    assert proxy.count(path=url) == 1  # asked once, never retried


def test_missing_prefix_fails_fast_naming_the_url(fault_proxy, prefix):
    proxy = fault_proxy(rate=0.0)
    with pytest.raises(fio.ObjectNotFoundError, match=f"{prefix}/nothing-here"):
        Flow.files(f"{prefix}/nothing-here", storage_options=proxy.storage_options())
    assert len(proxy.requests) <= 3


LEAK_KEY = "AKIAFLOWSS3LEAKTEST9"
LEAK_SECRET = "flowsS3LeakSecret+abcdef0123/456789"


def test_credentials_never_in_flow_errors_or_logs(fault_proxy, clips, prefix, caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "flowsEnvLeakSecret+0a1b2c/3d4e5f")
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="flows")
    _, remote = clips
    proxy = fault_proxy(rate=0.5, kinds=["500", "slowdown", "reset"], seed=2)
    options = proxy.storage_options(key=LEAK_KEY, secret=LEAK_SECRET)
    flow = Flow.files(f"{remote}/d1/*.wav", storage_options=options)
    assert len(epoch(audio_chain(flow, retries=8), workers=2)) == 2  # retried, and logged
    errors: list[BaseException] = []
    for url in (f"{prefix}/missing.wav", f"{remote}/d1/clip-001.wav"):
        flaky = Flow.from_source(urls_source([url]), storage_options=options).read(retries=0)
        for _ in range(3):
            try:
                epoch(flaky)
            except FlowsError as error:
                errors.append(error)
    assert errors and any("retrying" in r.getMessage() for r in caplog.records)
    secrets = [LEAK_KEY, LEAK_SECRET, "flowsEnvLeakSecret+0a1b2c/3d4e5f"]
    for text in [caplog.text, *map(str, errors), *map(repr, errors)]:
        for secret in secrets:
            assert secret not in text


def test_aws_environment_variables_are_honoured(clips, s3_server, monkeypatch, prefix):
    """Credentials, region and endpoint from AWS_* variables only, no storage_options."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    s3fs.S3FileSystem.clear_instance_cache()  # no client made under another environment
    local, remote = clips
    got = epoch(audio_chain(Flow.files(f"{remote}/d2/*.wav")))
    assert_same(localized(got, remote, str(local)),
                epoch(audio_chain(Flow.files(str(local / "d2" / "*.wav")))))
    manager = CheckpointManager(f"{prefix}/env-checkpoints")
    url = manager.save({"step": torch.tensor(7)}, step=7)
    assert url.startswith("s3://") and manager.load(url)["step"].item() == 7


# --------------------------------------------------------------------------- speed features


def test_parquet_rows_streamed_by_row_group_with_range_reads(fault_proxy, s3_options, prefix):
    """A flow over the rows of one row group reads the footer and that row group only."""
    rows, per_group = 6_000, 100  # 60 row groups of about 100 KB
    rng = random.Random(4)
    table = pa.table({"id": pa.array(range(rows)),
                      "blob": pa.array([rng.randbytes(1000) for _ in range(rows)])})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=per_group, compression="none")
    payload = sink.getvalue().to_pybytes()
    url = f"{prefix}/rows.parquet"
    fsspec.filesystem("s3", **s3_options).pipe_file(url, payload)
    proxy = fault_proxy(rate=0.0)
    flow = Flow.table(url, storage_options=proxy.storage_options())
    wanted = list(range(4_200, 4_300))  # row group 42
    got = epoch(flow.select(wanted).shuffle(seed=1).batch(25), workers=2)
    assert sorted(int(i) for b in got for i in b["id"]) == wanted
    blobs = table.column("blob").to_pylist()
    assert all(bytes(x) == blobs[int(i)] for b in got for i, x in zip(b["id"], b["blob"], strict=True))
    assert all(r["range"] for r in proxy.requests if r["method"] == "GET")
    assert proxy.bytes_sent < len(payload) / 5, (proxy.bytes_sent, len(payload))


def test_local_cache_serves_later_epochs(clips, fault_proxy, tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "simplecache", {})  # undone after the test
    _, remote = clips
    proxy = fault_proxy(rate=0.0)
    flow = Flow.files(f"{remote}/d0/*.wav", storage_options=proxy.storage_options())
    proxy.reset_counts()  # the listing
    cached = (flow.read(cache_dir=str(tmp_path / "cache")).decode_audio().downmix()
              .resample(16_000).pad(4_000).batch(5))
    loader = cached.loader(num_workers=2)
    first = list(loader)
    assert proxy.count("GET") == 8
    proxy.reset_counts()
    assert_same(list(loader), first)
    assert len(proxy.requests) == 0  # the second epoch never touched S3
    assert len(os.listdir(tmp_path / "cache")) == 8


@pytest.mark.parametrize("change", ["grew", "shrank"])
def test_stale_listed_size_never_returns_wrong_data(change, fault_proxy, s3_options, prefix):
    """Sizes from a listing save the HEAD; an object rewritten since is still read whole."""
    url = f"{prefix}/object.bin"
    fs = fsspec.filesystem("s3", **s3_options)
    fs.pipe_file(url, b"x" * 1000)
    proxy = fault_proxy(rate=0.0)
    options = proxy.storage_options()
    assert fio.list_files_with_sizes(prefix, storage_options=options) == {url: 1000}
    assert fio.read_bytes(url, options) == b"x" * 1000
    new = b"y" * (1500 if change == "grew" else 500)
    fs.pipe_file(url, new)
    proxy.reset_counts()
    assert fio.read_bytes(url, options, backoff=0.001) == new
    assert [r["method"] for r in proxy.requests] == ["GET", "HEAD", "GET"]  # then asked afresh
    proxy.reset_counts()
    assert fio.read_bytes(url, options) == new  # the verified size is remembered
    assert [r["method"] for r in proxy.requests] == ["GET"]
