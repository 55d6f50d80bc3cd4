"""The ``flows`` command (also ``python -m flows``).

    flows train yesno --data-dir data/yesno --epochs 5        # then again with --resume
    flows inspect yesno --data-dir data/yesno                 # counts, histograms, plots
    flows bench yesno --data-dir data/yesno                   # throughput stage by stage, per-node stats
    flows demo                                                # kill a run, resume it, compare
    flows manifest s3://bucket/clips clips.arrow              # list once; Flow.files(..., manifest=)

``train``, ``inspect`` and ``bench`` take a recipe: a registered name or ``package.module:Class``.
Every field of the recipe's config dataclass is an option (``--data-dir``, ``--batch-size``, the
recipe's own), and for ``train`` every field of :class:`~flows.training.train.TrainConfig` too. Mistakes
(an unknown recipe, a missing data directory, a bad value) get one line, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm.contrib.logging import logging_redirect_tqdm

from flows.errors import FlowsError
from flows.sources import manifest
from flows.sources.files import AUDIO_EXTENSIONS
from flows.stats import Stats
from flows.stats import bench as stats_bench
from flows.storage import io
from flows.training.demo import run_demo
from flows.training.distributed import teardown
from flows.training.inspection import bench, describe
from flows.training.metrics_log import format_metrics
from flows.training.recipe import Recipe, RecipeConfig, get_recipe, make_config, recipe_names
from flows.training.train import TrainConfig, train

_RECIPE_COMMANDS = ("train", "inspect", "bench")


class _Parser(argparse.ArgumentParser):
    """Reports usage errors in one line."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flows`` command line with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("flows")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), logging_redirect_tqdm([logger]):
            warnings.showwarning = _warn
            args = _parser(_recipe_of(argv)).parse_args(argv)
            return args.run(args)
    except FlowsError as e:
        print(f"flows: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flows: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        logger.removeHandler(handler)


def _warn(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"flows: warning: {message}", file=sys.stderr)


def _recipe_of(argv: list[str]) -> type[Recipe] | None:
    """The recipe named on a recipe command's line (its options depend on it)."""
    if len(argv) >= 2 and argv[0] in _RECIPE_COMMANDS and not argv[1].startswith("-"):
        return get_recipe(argv[1])
    return None


def _parser(recipe: type[Recipe] | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="flows", description="Composable, exactly resumable data pipelines "
                     "for PyTorch training: train, inspect and benchmark recipes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    helps = {"train": "train a recipe (stop it any time; --resume continues exactly)",
             "inspect": "describe a recipe's data: counts, classes, durations, plots",
             "bench": "throughput of a recipe's train pipeline, stage by stage, then per-node stats"}
    runs = {"train": _train, "inspect": _inspect, "bench": _bench}
    for name in _RECIPE_COMMANDS:
        sub = commands.add_parser(name, help=helps[name], description=helps[name])
        sub.set_defaults(run=runs[name])
        sub.add_argument("recipe", metavar="RECIPE", help=f"a recipe: {_known()}, or "
                         "package.module:Class (its options show with RECIPE --help)")
        config = recipe.Config if recipe is not None else RecipeConfig
        _add_options(sub.add_argument_group("recipe options"), config)
        if name == "train":
            clash = {f.name for f in dataclasses.fields(config)} & \
                {f.name for f in dataclasses.fields(TrainConfig)}
            if clash:
                raise FlowsError(f"recipe options {sorted(clash)} clash with training options")
            _add_options(sub.add_argument_group("training options"), TrainConfig,
                         {"checkpoint_dir": "runs/RECIPE/checkpoints",
                          "log_path": "metrics.jsonl in the local checkpoint directory, "
                                      "else in runs/RECIPE"})
        elif name == "inspect":
            sub.add_argument("--out", help="folder for the plots (default: runs/RECIPE/inspect)")
            sub.add_argument("--limit", type=int, help="look at the first N samples of each split")
        else:
            sub.add_argument("--samples", type=int, default=256,
                             help="samples timed per stage (default: 256)")
            sub.add_argument("--bench-epochs", type=int, default=1,
                             help="epochs of the whole train loader measured with stats (default: 1)")
            sub.add_argument("--trace", metavar="JSON",
                             help="also write a Chrome trace of those epochs to this file")
    demo = commands.add_parser("demo", help="train on synthetic YESNO, kill the run, resume "
                               "it, and check it matches an uninterrupted run bit for bit")
    demo.set_defaults(run=_demo)
    demo.add_argument("--recipe", default="yesno", help="the recipe (default: yesno)")
    demo.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
    demo.add_argument("--kill-at", type=int, help="step to kill at (default: mid-epoch 2)")
    demo.add_argument("--workers", type=int, default=2, help="workers before the kill (default: 2)")
    demo.add_argument("--resume-workers", type=int, default=0,
                      help="workers after resuming (default: 0)")
    demo.add_argument("--workdir", help="keep the data and checkpoints here (default: a "
                      "temporary folder, removed at the end)")
    listing = commands.add_parser("manifest", help="list the files under a URL once into an Arrow "
                                  "manifest (path, size, mtime) to reuse: Flow.files(URL, manifest=OUT) "
                                  "or Flow.table(OUT)")
    listing.set_defaults(run=_manifest)
    listing.add_argument("url", metavar="URL", help="a local directory, fsspec URL or glob")
    listing.add_argument("out", metavar="OUT", help="the manifest file to write (.arrow)")
    listing.add_argument("--extensions", nargs="*", default=list(AUDIO_EXTENSIONS),
                         help="keep these extensions only; none given: every file "
                              f"(default: {' '.join(AUDIO_EXTENSIONS)})")
    listing.add_argument("--no-recursive", dest="recursive", action="store_false",
                         help="only the files directly under URL")
    listing.add_argument("--storage-options", type=_json_object, metavar="JSON",
                         help="fsspec options for URL (credentials, endpoint)")
    return parser


def _known() -> str:
    """The known recipes, for the help."""
    return ", ".join(recipe_names()) or "none installed"


# ---- options from config dataclasses ------------------------------------------------------------
def _add_options(group: argparse._ArgumentGroup, config: type,
                 shown: dict[str, str] | None = None) -> None:
    """One ``--field-name`` option per field of the dataclass ``config`` (default None: keep the
    dataclass default), typed after the field's annotation. ``shown`` overrides the defaults
    the help shows."""
    hints = typing.get_type_hints(config)
    helps = {f.name: f.metadata["help"] for base in reversed(config.__mro__)
             if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
             if "help" in f.metadata}
    for f in dataclasses.fields(config):
        kind = _unwrap_optional(hints[f.name])
        default = (shown or {}).get(f.name, f.default)
        show = f"(default: {default})" if default not in (None, dataclasses.MISSING) else None
        help = " ".join(filter(None, [helps.get(f.name), show]))
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": help}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            options.update(choices=choices, type=type(choices[0]))
        elif kind is dict or typing.get_origin(kind) is dict:
            options.update(type=_json_object, metavar="JSON")
        elif typing.get_origin(kind) in (list, tuple):
            item = typing.get_args(kind)[0]
            options.update(type=item, nargs="+", metavar=_metavar(f.name, item))
        else:
            options.update(type=kind if kind in (int, float) else str,
                           metavar=_metavar(f.name, kind))
        group.add_argument("--" + f.name.replace("_", "-"), **options)


def _metavar(name: str, kind: Any) -> str:
    if kind in (int, float):
        return "N" if kind is int else "X"
    return "URL" if name.endswith(("_dir", "_path")) else "TEXT"


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return hint


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The options given on the command line for the fields of ``config``."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def _recipe(args: argparse.Namespace) -> Recipe:
    """The recipe named in ``args``, configured, with its data directory checked."""
    cls = get_recipe(args.recipe)
    config = make_config(cls, **_values(args, cls.Config))
    hint = f"; {cls.data_hint}" if cls.data_hint else ""
    if config.data_dir is None:
        raise FlowsError(f"recipe {cls.name!r} needs --data-dir{hint}")
    if getattr(config, "download", False):
        return cls(config)  # the recipe fetches its data into data_dir, creating it
    fs, path = io.filesystem(config.data_dir, config.storage_options)
    try:
        exists = fs.exists(path)
    except Exception:  # cannot tell from here (credentials, network): the flow will report
        exists = True
    if not exists:
        raise FlowsError(f"data directory {config.data_dir} does not exist{hint}")
    return cls(config)


# ---- commands -----------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    options = _values(args, TrainConfig)
    options.setdefault("checkpoint_dir", f"runs/{recipe.name}/checkpoints")
    local = "://" not in options["checkpoint_dir"]
    run_dir = options["checkpoint_dir"] if local else f"runs/{recipe.name}"
    options.setdefault("log_path", str(Path(run_dir) / "metrics.jsonl"))
    try:
        result = train(recipe, TrainConfig(**options))  # under torchrun: one rank of the job
    finally:
        teardown()  # the process group train() joined, if it did
    scores = format_metrics(result.metrics or result.train_metrics)
    skipped = result.skipped
    skips = (f"; skipped {skipped['train']} training samples in all, {skipped['eval']} in the "
             f"last evaluation" if options.get("on_error") == "skip" else "")
    best = result.best
    if best is not None:
        scores += f"; best eval: epoch {best['epoch']} (step {best['step']}): " \
                  f"{format_metrics(best['metrics'])}"
    if _rank() == 0:
        print(f"{recipe.name}: step {result.step}, epoch {result.epoch}: {scores} "
              f"({result.seconds:.1f} s){skips}; checkpoint {result.checkpoint}")
    return 128 + signal.Signals[result.interrupted] if result.interrupted else 0


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _inspect(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    print(describe(recipe, args.out or f"runs/{recipe.name}/inspect", args.limit))
    return 0


def _bench(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    print(bench(recipe, args.samples))
    workers = recipe.config.num_workers
    print(f"\ntrain loader, {workers} worker(s), {args.bench_epochs} epoch(s), per node:")
    with recipe.train_flow().loader(workers, stats=Stats(trace=bool(args.trace))) as loader:
        report = stats_bench(loader, epochs=args.bench_epochs)
    print(report.table())
    if args.trace:
        print(f"Chrome trace: {report.save_trace(args.trace)}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    count = manifest.write(args.url, args.out, args.extensions or None, args.recursive,
                           args.storage_options)
    print(f"{args.out}: {count} files listed under {io.redact(args.url, args.storage_options)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    result = run_demo(args.workdir, args.recipe, args.epochs, args.kill_at, args.workers,
                      args.resume_workers)
    return 0 if result.identical else 1
