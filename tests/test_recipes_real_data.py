"""The generic recipes (``folder``, ``table``) on data shaped like real corpora, through the
``flows`` command: splits by a field of the file name, a single class refused, ``--table`` and
``--root`` resolved alike, empty splits that name the values there are, the files' own sample
rate, the best evaluation beside the last, stratified splits, natural class order, a table's
own class ids, and readable ``flows inspect`` plots."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from flows.training.inspection import describe
from flows.training.metrics_log import read_log
from recipes.folder import Folder
from recipes.table import TableRecipe
from recipes.urbansound8k import UrbanSound8K
from tests.test_cli import run


def one_line(err: str, message: str) -> None:
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def write(path: Path, pitch: float, rate: int = 8000, frames: int = 800) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.5 * np.sin(np.arange(frames) * pitch), rate)


def flat_folder(root: Path, takes: dict[str, int], rate: int = 8000) -> Path:
    """``root/{word}_{take}.wav``: ``takes[word]`` files of each word, 8 kHz speech-like tones."""
    for pitch, (word, count) in enumerate(takes.items(), start=1):
        for take in range(count):
            write(root / f"{word}_{take}.wav", pitch / 7, rate)
    return root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


WORD = r"^([a-z]+)_"
TAKE = r"_(\d+)\.wav$"


# ---- folder: a split given by the file name ------------------------------------------------
def test_folder_split_by_a_field_of_the_file_name(capsys, tmp_path):
    data = flat_folder(tmp_path / "data", {"left": 10, "right": 10})
    code, out, err = run(capsys, "inspect", "folder", "--data-dir", str(data), "--label", WORD,
                         "--split-by", TAKE, "--eval-values", "0-4", "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "train: 10 samples" in out and "eval: 10 samples" in out
    recipe = Folder(Folder.Config(data_dir=str(data), label=WORD, split_by=TAKE, eval_values="0-4",
                                  train_values="7,8"))
    source = recipe.eval_flow().source
    assert source is not None
    assert sorted(source.column("key").tolist()) == sorted(
        f"{w}_{t}.wav" for w in ("left", "right") for t in range(5))
    train_source = recipe.train_flow().source
    assert train_source is not None and sorted(train_source.column("key").tolist()) == [
        "left_7.wav", "left_8.wav", "right_7.wav", "right_8.wav"]
    by_callable = Folder(Folder.Config(data_dir=str(data), label=WORD, eval_values="0",
                                       split_by=lambda name: int(name[:-4].split("_")[1]) % 5))
    assert len(by_callable.eval_flow().source or []) == 4  # takes 0 and 5 are field 0
    code, _, err = run(capsys, "train", "folder", "--data-dir", str(data), "--label", WORD,
                       "--split-by", TAKE, "--eval-values", "0-4", "--epochs", "1", "--no-progress",
                       "--checkpoint-dir", str(tmp_path / "run"))
    assert code == 0, err


@pytest.mark.parametrize(("options", "message"), [
    (["--eval-values", "42"], "folder: no file has a --split-by value in --eval-values 42; the "
                              "values found: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"),
    (["--eval-values", "0-9"], "folder: no file has a --split-by value outside --eval-values "
                               "0-9: none is left to train on; the values found: 0, 1, 2"),
    (["--eval-values", "0", "--train-values", "11"], "no file has a --split-by value in "
                                                     "--train-values 11: none is left to train on"),
    ([], "split_by (--split-by) needs eval_values (--eval-values)"),
])
def test_folder_split_by_mistakes_get_one_line(capsys, tmp_path, options, message):
    data = flat_folder(tmp_path / "data", {"left": 10, "right": 10})
    code, _, err = run(capsys, "inspect", "folder", "--data-dir", str(data), "--label", WORD,
                       "--split-by", TAKE, *options, "--out", str(tmp_path / "p"))
    assert code == 1
    one_line(err, message)


# ---- a single class is refused -------------------------------------------------------------
def test_a_flat_folder_with_the_default_label_rule_is_refused(capsys, tmp_path):
    data = flat_folder(tmp_path / "waves", {"left": 4, "right": 4})
    code, _, err = run(capsys, "train", "folder", "--data-dir", str(data), "--epochs", "1",
                       "--no-progress", "--checkpoint-dir", str(tmp_path / "run"))
    assert code == 1
    one_line(err, "flows: error: folder: the data has the single class 'waves'; a classifier "
                  "needs at least two. The labels came from each file's folder name (--label)")
    assert not any((tmp_path / "run").iterdir())  # refused before anything trained or was saved


# ---- table: --table and --root resolved the same way ---------------------------------------
@pytest.fixture
def table_data(tmp_path: Path) -> Path:
    """``data/meta/clips.csv`` (path relative to ``data/audio``, label, fold 1-5, split) and
    ``data/audio/{label}/{n}.wav``."""
    data = tmp_path / "data"
    rows = []
    for pitch, label in enumerate(["cat", "dog"], start=1):
        for n in range(10):
            write(data / "audio" / label / f"{n}.wav", pitch / 5)
            rows.append({"path": f"{label}/{n}.wav", "label": label, "fold": n % 5 + 1,
                         "split": "test" if n < 2 else "train"})
    (data / "meta").mkdir()
    pd.DataFrame(rows).to_csv(data / "meta" / "clips.csv", index=False)
    return data


def test_table_and_root_are_both_below_the_data_dir(capsys, table_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "data" / "meta")  # neither path is relative to the cwd
    code, out, err = run(capsys, "inspect", "table", "--data-dir", str(table_data), "--table",
                         "meta/clips.csv", "--root", "audio", "--split-column", "split",
                         "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "train: 16 samples" in out and "eval: 4 samples" in out
    monkeypatch.setenv("COLUMNS", "250")  # help lines unwrapped
    code, out, _ = run(capsys, "train", "table", "--help")
    help = " ".join(out.split())
    assert "--table TEXT the CSV or Parquet table: a path relative to --data-dir, an absolute " \
           "path or a URL" in help
    assert "--root TEXT where the path column's relative paths point: a path relative to " \
           "--data-dir, an absolute path or a URL" in help
    code, _, err = run(capsys, "inspect", "table", "--data-dir", str(table_data), "--table",
                       "clips.csv", "--out", str(tmp_path / "p"))
    assert code == 1
    one_line(err, f"table {table_data}/clips.csv does not exist (--table is a path relative to "
                  "--data-dir, an absolute path or a URL)")


# ---- an empty split names the split and the values there are --------------------------------
@pytest.mark.parametrize(("options", "message"), [
    (["--fold-column", "fold", "--eval-folds", "7"],
     "no rows for the eval split: column fold has no value in --eval-folds 7; its values: "
     "1, 2, 3, 4, 5"),
    (["--fold-column", "fold", "--eval-folds", "1", "--train-folds", "8", "9"],
     "no rows for the train split: column fold has no value in --train-folds 8 9; its values: "
     "1, 2, 3, 4, 5"),
    (["--split-column", "split", "--eval-split", "validation"],
     "no rows for the eval split: column split has no value in --eval-split validation; its "
     "values: test, train"),
])
def test_an_empty_split_says_which_and_the_values_there_are(capsys, table_data, tmp_path, options,
                                                            message):
    code, _, err = run(capsys, "train", "table", "--data-dir", str(table_data), "--table",
                       "meta/clips.csv", "--root", "audio", *options, "--epochs", "1",
                       "--checkpoint-dir", str(tmp_path / "run"), "--no-progress")
    assert code == 1
    one_line(err, f"flows: error: table {table_data}/meta/clips.csv: {message}")


def test_urbansound8k_eval_folds_that_do_not_exist(capsys, tmp_path):
    data = UrbanSound8K.generate(tmp_path / "us8k", clips_per_fold=1)
    code, _, err = run(capsys, "inspect", "urbansound8k", "--data-dir", str(data), "--eval-folds",
                       "11", "--out", str(tmp_path / "p"))
    assert code == 1
    one_line(err, "no rows for the eval split: column fold has no value in --eval-folds 11; its "
                  "values: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10")


# ---- the files' own sample rate, and the best evaluation -------------------------------------
def test_the_files_own_rate_is_kept_and_the_best_eval_is_reported(capsys, tmp_path):
    data = flat_folder(tmp_path / "data", {"left": 6, "right": 6})
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "folder", "--data-dir", str(data), "--label", WORD,
                         "--seconds", "0.1", "--epochs", "3", "--batch-size", "4", "--no-progress",
                         "--checkpoint-dir", str(run_dir))
    assert code == 0, err
    assert "sample rate: 8000 Hz, the files' own (12 files probed; --sample-rate resamples)" in err
    assert "several sample rates" not in err
    evals = [r for r in read_log(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["loss"])
    shown = re.search(r"; best eval: epoch (\d+) \(step (\d+)\): loss (\S+)", out)
    assert shown is not None, out
    assert (int(shown[1]), int(shown[2])) == (best["epoch"], best["step"])
    assert float(shown[3]) == pytest.approx(best["loss"], rel=1e-3)
    assert out.startswith(f"folder: step {evals[-1]['step']}, epoch 3: loss ")  # the last one first
    batch = next(iter(Folder(Folder.Config(data_dir=str(data), label=WORD)).train_flow().loader()))
    assert set(batch["sample_rate"].tolist()) == {8000}


def test_several_rates_resample_to_16k_and_say_why(capsys, tmp_path):
    data = flat_folder(tmp_path / "data", {"left": 3})
    flat_folder(data, {"right": 3}, rate=22050)
    code, _, err = run(capsys, "inspect", "folder", "--data-dir", str(data), "--label", WORD,
                       "--out", str(tmp_path / "p"))
    assert code == 0
    assert ("flows: warning: the files have several sample rates (8000 Hz: 3, 22050 Hz: 3 of 6 "
            "probed): resampling every clip to 16000 Hz; choose with --sample-rate") in err
    recipe = Folder(Folder.Config(data_dir=str(data), label=WORD))
    with pytest.warns(UserWarning, match="several sample rates"):
        assert recipe.sample_rate == 16_000


# ---- stratified random splits ----------------------------------------------------------------
@pytest.mark.parametrize("options", [["--eval-fraction", "0.2"],
                                     *[["--folds", "5", "--fold", str(k)] for k in range(5)]])
def test_random_eval_splits_are_stratified_by_class(capsys, tmp_path, options):
    data = flat_folder(tmp_path / "data", {"common": 20, "rare": 5})
    code, out, err = run(capsys, "inspect", "folder", "--data-dir", str(data), "--label", WORD,
                         *options, "--out", str(tmp_path / "p"))
    assert code == 0, err
    eval_part = out.split("\neval: ")[1]
    assert eval_part.startswith("5 samples") and "label: common: 4 (80%)  rare: 1 (20%)" in eval_part


def test_k_fold_holds_every_file_out_once(tmp_path):
    data = flat_folder(tmp_path / "data", {"common": 9, "rare": 4})
    held: list[str] = []
    for fold in range(3):
        source = Folder(Folder.Config(data_dir=str(data), label=WORD, folds=3, fold=fold,
                                      sample_rate=8000)).eval_flow().source
        assert source is not None
        held += source.column("key").tolist()
    assert sorted(held) == sorted(p.name for p in data.iterdir())


# ---- class ids -------------------------------------------------------------------------------
def test_classes_in_natural_order(capsys, tmp_path):
    data = tmp_path / "data"
    for n in (1, 2, 10):
        for take in range(3):
            write(data / f"speaker_{n}" / f"{take}.wav", n / 20)
    code, out, err = run(capsys, "inspect", "folder", "--data-dir", str(data), "--eval-fraction",
                         "0.3333", "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "label: speaker_1: 2 (33%)  speaker_2: 2 (33%)  speaker_10: 2 (33%)" in out
    assert Folder(Folder.Config(data_dir=str(data))).classes == ["speaker_1", "speaker_2", "speaker_10"]


def test_a_tables_numeric_classes_keep_their_values_and_an_id_column_is_used(
        capsys, table_data, tmp_path):
    meta = pd.read_csv(table_data / "meta" / "clips.csv")
    meta["species"] = meta["label"].map({"cat": 7, "dog": 3})
    meta["name"] = meta["label"].map({"cat": "felis", "dog": "canis"})
    meta.to_csv(table_data / "meta" / "clips.csv", index=False)
    common = ["--data-dir", str(table_data), "--table", "meta/clips.csv", "--root", "audio",
              "--split-column", "split", "--out", str(tmp_path / "p")]
    code, out, err = run(capsys, "inspect", "table", *common, "--label-column", "species")
    assert code == 0, err
    assert "label: 3: 8 (50%)  7: 8 (50%)" in out
    numeric = TableRecipe(TableRecipe.Config(data_dir=str(table_data), table="meta/clips.csv",
                                             root="audio", label_column="species",
                                             split_column="split"))
    assert numeric.classes == [str(i) for i in range(8)] and numeric.outputs() == 8
    batch = next(iter(numeric.eval_flow().loader()))
    assert batch["label"].tolist() == batch["species"].tolist()
    code, out, err = run(capsys, "inspect", "table", *common, "--label-column", "name",
                         "--id-column", "species")
    assert code == 0, err
    assert "label: canis: 8 (50%)  felis: 8 (50%)" in out
    named = TableRecipe(TableRecipe.Config(data_dir=str(table_data), table="meta/clips.csv",
                                           root="audio", label_column="name",
                                           id_column="species", split_column="split"))
    assert named.classes[3] == "canis" and named.classes[7] == "felis"
    batch = next(iter(named.eval_flow().loader()))
    assert batch["label"].tolist() == batch["species"].tolist()
    meta.assign(species=3).to_csv(table_data / "meta" / "one.csv", index=False)
    code, _, err = run(capsys, "train", "table", *common[:-2], "--label-column", "species",
                       "--table", "meta/one.csv", "--checkpoint-dir", str(tmp_path / "run"))
    assert code == 1  # one numeric class: refused although it is index 3 of 4
    one_line(err, "table: the data has the single class '3'; a classifier needs at least two. Is "
                  "--label-column species the column of classes?")
    meta.loc[0, "species"] = 5  # a felis with another id
    meta.to_csv(table_data / "meta" / "clips.csv", index=False)
    code, _, err = run(capsys, "train", "table", *common[:-2], "--label-column", "name",
                       "--id-column", "species", "--checkpoint-dir", str(tmp_path / "run"))
    assert code == 1
    one_line(err, "name 'felis' goes with several values of the other column (species and name "
                  "must match one to one)")


# ---- flows inspect: readable plots -----------------------------------------------------------
def test_inspect_plots_fifty_classes_readably_with_distinct_waveforms(capsys, tmp_path):
    data = tmp_path / "data"
    for n in range(1, 51):
        for take in range(2):
            write(data / f"speaker_{n}" / f"{take}.wav", n / 60, frames=400)
    few = tmp_path / "few"
    for n in range(1, 4):
        for take in range(2):
            write(few / f"speaker_{n}" / f"{take}.wav", n / 60, frames=400)
    sizes, outs = {}, {}
    for name, folder in (("many", data), ("few", few)):
        code, outs[name], err = run(capsys, "inspect", "folder", "--data-dir", str(folder),
                                    "--out", str(tmp_path / name))
        assert code == 0, err
        sizes[name] = png_size(tmp_path / name / "classes.png")
    train_text = outs["many"].split("\neval: ")[0]
    assert all(f"speaker_{n}: " in train_text for n in range(1, 51))
    assert all(len(line) <= 100 for line in train_text.splitlines())  # wrapped between classes
    assert sizes["many"][1] >= 50 * 15 > sizes["few"][1]  # about 20 pixels a class
    recipe = Folder(Folder.Config(data_dir=str(data), sample_rate=8000))
    report = describe(recipe, tmp_path / "python", examples=4)
    probe = report.splits[0].probe
    assert probe is not None
    classes = [label for _, label, _, _ in probe.examples]
    assert len(classes) == 4 and len(set(classes)) == 4  # four classes, one waveform each
