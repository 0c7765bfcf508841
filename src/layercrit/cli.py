"""Command line: a thin layer over the library. Each subcommand has an ``_add_*`` (arguments) and a ``_cmd_*``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .errors import LayercritError


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="layercrit",
        description="Measure how much each layer of a trained vision model matters to its predictions: reset one "
        "layer at a time, re-evaluate, compare with the unmodified model (criticality = 1 - cos sim of softmax).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    parser.add_argument("--version", action="version", version=f"layercrit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(message)s")
        if args.command in _MEASURING:
            from .measurement.engine import keep_freed_memory

            keep_freed_memory()  # this process is ours: the allocator may keep freed memory (see its docstring)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = args.func(args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return code
    except LayercritError as error:
        print(f"layercrit: error: {as_flags(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layercrit: interrupted; finished results are on disk", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python's documented way (see "Note on SIGPIPE" in the signal module): send what is left to devnull so
        # the flush at exit does not fail again, and exit as a process ended by SIGPIPE does (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line, as an error is (``layercrit: warning: ...``)."""
    print(f"layercrit: warning: {message}", file=sys.stderr if file is None else file)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line like every other user mistake (``layercrit: error: ...``, exit status 2)."""

    def error(self, message: str):
        raise LayercritError(f"{message} (see {self.prog} --help)")


def _whole_number(least: int):
    """argparse type: a count of at least ``least`` (``--images -5`` would mean "all but five")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"give a whole number of at least {least}, not {text!r}")
        return value
    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)  # 0 means none


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"give a number of 0 or more, not {text!r}")
    return value


def as_flags(message: str) -> str:
    """The library names its parameters (``bn='x': ...``); on the command line they are flags (``--bn='x': ...``)."""
    from .spec import FIELDS

    names = "|".join(sorted(FIELDS, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({names})=", lambda m: f"--{m.group(1).replace('_', '-')}=", message)


# ---------------------------------------------------------------- shared options


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="timm:NAME[.TAG] | hf-hub:ORG/NAME | torchvision:NAME[:WEIGHTS] | "
                   "zoo:ZOO/ID | MODULE:FACTORY | FILE.py:FACTORY (imports and runs that code) | CKPT")
    g.add_argument("--arch", help="architecture of a checkpoint: timm:NAME | hf-hub:ORG/NAME | torchvision:NAME | "
                   "layercrit:NAME | MODULE:FACTORY | FILE.py:FACTORY")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init instead of weights")
    g.add_argument("--num-classes", type=_positive_int, help="classes of a checkpoint's head (default: read from the file)")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints holding pickled objects")
    g.add_argument("--model-id", help="name for the model in results (default: the spec)")


def add_measure_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--task", default="image-classification", help="what a batch is and which outputs are compared: "
                   "image-classification (default) | sequence-classification (token ids)")
    g.add_argument("--layers", default="conv,linear", help="kinds (conv, linear, bn, ln) and/or name globs")
    g.add_argument("--reset", default="rerandomize",
                   help="NAME or NAME(OPTION=VALUE,...): rerandomize | zero | reinit(checkpoint=CKPT) | "
                        "rewind(checkpoint=CKPT) | noise(scale=S or sigma=S[,base=RESET]) | "
                        "interpolate(alpha=A[|A2...][,base=RESET]); --init/--to, --scale, --alpha, --base are "
                        "shorthands for the common options")
    g.add_argument("--trials", type=_positive_int, default=3, help="resets per layer (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the random resets")
    g.add_argument("--data-seed", type=int, default=-1, help="seed of the image subset alone, so the same images "
                   "can be kept while resets vary (default -1: --seed)")
    g.add_argument("--init", "--to", dest="checkpoint", help="checkpoint for reinit (--init) / rewind (--to): "
                   "reinit(checkpoint=CKPT)")
    g.add_argument("--scale", type=float, help="noise: std as a multiple of each tensor's std: noise(scale=S)")
    g.add_argument("--alpha", help="interpolate: weights of the base reset, comma separated, each in [0, 1]")
    g.add_argument("--base", help="interpolate / noise: the reset to move towards / add noise to")
    g.add_argument("--bn", nargs="+", default=["keep"], metavar="MODE",
                   help="BatchNorm statistics: keep (the paper's method) | reset | recalibrate K")
    g.add_argument("--groups", help="reset together: blocks | stages | FILE (YAML/JSON: group -> layer globs)")
    g.add_argument("--cumulative", choices=["prefix", "suffix"], help="reset targets 1..k (prefix) or k..L (suffix)")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="fast", choices=["fast", "naive"], help="fast (prefix replay) or naive")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--batch-size", type=_positive_int, help="images per forward (default 100 on CPU; on CUDA 500, halved "
                   "while out of memory)")
    e.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    e.add_argument("--max-cache-mb", type=_non_negative_float, default=4096.0, help="memory for recorded clean activations")
    e.add_argument("--compile", action="store_true", help="torch.compile the model (full forwards per unit)")
    e.add_argument("--exact", action="store_true", help="NCHW layout, BatchNorm not folded: the fast engine then "
                   "equals the naive one bit for bit (by default they agree to the last bits of fp32)")
    e.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="convolutions in NHWC layout "
                   "(default: on for the fast engine, off for the naive one; last bits of fp32 only)")
    e.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, help="fold eval-mode BatchNorm into the "
                   "convolution before it (default: on for the fast engine without --compile; last bits only)")
    g.add_argument("--target-ci", type=float, help="sequential design: estimate each layer's expected criticality "
                   "over resets and images to ± this (fraction, 95%%), each trial a new reset on its own block of "
                   "images, trials added where the interval is still wide (default: the paper's fixed design)")
    g.add_argument("--max-trials", type=_positive_int, default=100, help="with --target-ci: most trials per layer (100)")
    g.add_argument("--images-per-trial", type=_positive_int, help="with --target-ci: images per trial after the pilot "
                   "(default: Cochran's rule on the pilot's variance components)")
    o = p.add_argument_group("outputs")
    o.add_argument("--save-logits", action="store_true", help="keep every evaluation's logits in OUT/logits (float16; "
                   "read with layercrit.load_logits); 10,000 images x 1,000 classes x 163 evaluations is ~3 GB")
    o.add_argument("--save-logits-top-k", type=_positive_int, help="with --save-logits: only the k largest logits and their "
                   "classes")
    o.add_argument("--log-to", metavar="TRACKER[:DIR]", help="log each layer's criticality (with its interval) and the "
                   "options to wandb | mlflow | tensorboard as layers finish (DIR: where; default OUT/TRACKER, "
                   "MLflow its tracking URI); needs pip install 'layercrit[trackers]'")
    o.add_argument("--log-batches", action="store_true", help="a batch_acc column: each batch's top-1 (%%) as a JSON "
                   "list, as in the paper's CSV")
    o.add_argument("--per-class", action="store_true", help="OUT/per_class.csv: each class's accuracy, its drop and "
                   "agreement per (layer, trial)")
    e.add_argument("--image-target-ci", type=float, help="stop each (layer, trial) early once its criticality and "
                   "top-1 over images are known to ± this (fraction, 95%% confidence sequence)")


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="image folder (ImageNet-val layout), 'fashion-mnist' (its test "
                                                      "set) or 'fashion-mnist-train'")
    g.add_argument("--data-root", help="folder with the Fashion-MNIST IDX .gz files")
    g.add_argument("--images", type=_positive_int, default=10_000, help="images to evaluate (default 10000, as the paper)")
    g.add_argument("--cache-dir", help="where decoded evaluation sets are kept (default ~/.cache/layercrit)")
    g.add_argument("--no-cache", dest="use_cache", action="store_false", help="decode without the disk cache")
    g.add_argument("--skip-bad-images", action="store_true", help="skip (and count) images that fail to decode")
    g.add_argument("--resize", type=_positive_int, help="resize shorter side to N (default: the model's config, or 256)")
    g.add_argument("--crop", type=_positive_int, help="center crop N (default: the model's config, or 224)")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"],
                   help="resize interpolation when --resize/--crop are given (default bilinear)")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalise the model's input with this mean "
                   "per channel (with --std), instead of the model's own config; a model without a config (an "
                   "nn.Module, MODULE:FACTORY) is otherwise fed images in [0, 1]")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="the std per channel, with --mean")
    g.add_argument("--no-normalize", dest="normalize", action="store_false", help="no normalisation at all: the "
                   "data is normalised already")


# ---------------------------------------------------------------- run


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="measure one model's layer criticality")
    add_model_options(p)
    add_data_options(p)
    add_measure_options(p)
    p.add_argument("--out", required=True, help="output folder for results.csv / .parquet / .json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from .measurement.engine import check_device
    from .results import claim_output_folder

    check_device(args.device, "--device")
    with claim_output_folder(args.out) as out:
        df, csv_path = _run_into(out, args)
    for reset, rows in df.groupby("reset", sort=False):  # interpolate: one summary per alpha
        if df.reset.nunique() > 1:
            print(f"reset {reset}:")
        print_summary(rows)
    print(f"results: {csv_path}, {csv_path.with_suffix('.parquet')} and {csv_path.with_suffix('.json')}")
    return 0


def _run_into(out: Path, args):
    """Measure into ``out`` (held by this process); the results table and the path of results.csv.

    run.json says ``"complete": false`` beside every chunk's results and ``true`` beside the final ones (renamed
    into place last), so a reader can tell a finished folder from one that a kill interrupted.
    """
    from .measurement.prepare import execute, prepare
    from .models import resolve_model
    from .results import write_results

    experiment = experiment_from_args(args)
    resolved = resolve_model(args.model, arch=args.arch, pretrained=args.pretrained, num_classes=args.num_classes,
                             trust_checkpoint=args.trust_checkpoint, seed=args.seed, model_id=args.model_id)
    # run.json goes with the results it describes: a run that fails before its first results leaves the folder as is
    run = {**{k: v for k, v in vars(args).items() if k != "func"}, "spec_id": experiment.spec_id()}
    tracker = None
    if experiment.log_to:  # its folder is checked before any work
        from .trackers import Tracker

        tracker = Tracker(experiment.log_to, name=args.model_id or resolved.spec, config=run, out=out,
                          sequential=experiment.sequential)
    prepared = prepare(resolved, spec=experiment, model_id=args.model_id, trust_checkpoint=args.trust_checkpoint)
    print(prepared.describe())
    run.update(preprocessing=prepared.inputs(), task=prepared.task.name)

    def on_rows(rows) -> None:
        write_results(rows, out, {**run, "complete": False})
        if tracker is not None:
            tracker(rows)

    try:
        df = execute(prepared, on_rows=on_rows, progress=False if args.quiet else None)
        csv_path, _ = write_results(df, out, {**run, "complete": True})
        if tracker is not None:
            tracker.close(df)
    finally:
        if tracker is not None:
            tracker.close()  # a failed run's tracker run ends with the layers it finished
    return df, csv_path


def experiment_from_args(args):
    """The :class:`~layercrit.spec.Experiment` that ``run``'s flags describe (``--bn recalibrate 8`` as one
    string, as a sweep config writes it)."""
    from .spec import FIELDS, RESET_SHORTHANDS, Experiment, with_shorthands

    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    values["bn"] = " ".join(args.bn)
    out = Path(getattr(args, "out", None) or ".")  # the run's outputs go into its folder
    values["save_logits"] = str(out / "logits") if args.save_logits else None
    values["per_class"] = str(out / "per_class.csv") if args.per_class else None
    values["reset"] = with_shorthands(args.reset, {name: getattr(args, name, None) for name in RESET_SHORTHANDS})
    return Experiment(**values)


def print_summary(df) -> None:
    from .measurement.estimate import layer_table

    original = df[df.layer == "original"].iloc[0]
    skipped = int(original.n_skipped)
    print(f"original: top-1 {original.top1_acc:.2f}%  top-5 {original.top5_acc:.2f}%  loss {original.loss:.4f} "
          f"on {int(original.n_images)} images" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    layers = layer_table(df)
    if layers.empty:
        return
    print("most critical layers (criticality = 1 - cos sim of softmax, fraction; ± 95% interval over resets):")
    for _, row in layers.sort_values("criticality", ascending=False).head(10).iterrows():
        capped = "  (hit --max-trials)" if row.capped else ""
        print(f"  {row.layer:<40} {row.criticality:.4f} ± {row.criticality_ci:.4f}  "
              f"({row.trials} resets, {row.images} images){capped}")
    if layers.capped.any():
        print(f"{int(layers.capped.sum())} layer(s) hit --max-trials before reaching --target-ci; all layers: layers.csv")


def _add_resets(sub) -> None:
    p = sub.add_parser("resets", help="the reset strategies, each with the options it declares")
    p.set_defaults(func=_cmd_resets)


def _cmd_resets(args) -> int:
    from .measurement.resets import RESETS, declared_options

    print("--reset NAME or NAME(OPTION=VALUE,...):")
    for name, cls in RESETS.items():
        options = ", ".join(f"{key} ({what})" for key, what in declared_options(name).items()) or "no options"
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")
        print(f"  {name:<12} {options}\n  {'':<12} {summary}")
    return 0


# ---------------------------------------------------------------- zoo


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="list model zoos; train the Fashion-MNIST zoo")
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True)
    listing = zoo_sub.add_parser("list", help="the models of a zoo with categories and accuracies")
    listing.add_argument("--zoo", default="fmnist", help="which zoo (default fmnist)")
    listing.add_argument("--seeds", action="store_true", help="also the training-seed replicates (ID@seedN)")
    listing.set_defaults(func=_cmd_zoo_list)
    train = zoo_sub.add_parser("train", help="train the Fashion-MNIST zoo (seeded) into a folder")
    train.add_argument("--methods", nargs="+", help="ids, methods or categories to train (default: all)")
    train.add_argument("--out", default="runs/zoo-fmnist", help="zoo folder to write (default runs/zoo-fmnist)")
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    train.add_argument("--threads", type=_positive_int, help="CPU threads for torch (the shipped zoo used 2)")
    train.add_argument("--seed", type=int, default=0, help="seed of init, batch order and augmentation")
    train.add_argument("--test-images", type=_positive_int, help="evaluate on the first N test images (default all 10000)")
    train.add_argument("--data-root", help="folder with the Fashion-MNIST IDX .gz files")
    train.add_argument("--robust-images", type=_non_negative_int, default=1000, help="test images for the robust accuracy under "
                       "PGD-10 at every adversarial budget of the zoo (default 1000; 0: skip)")
    train.add_argument("--precision", choices=["fp32", "bf16"], help="train in this precision instead of the recipe's "
                       "(bf16: the shipped zoo, on a CPU with AMX; fp32: 5x faster on an AVX2-only CPU); recorded")
    train.add_argument("--force", action="store_true", help="train members again that the folder already holds with "
                       "the same recipe and seed (by default they are skipped, so a killed run goes on)")
    train.set_defaults(func=_cmd_zoo_train)
    fetch = zoo_sub.add_parser("download", help="put a zoo's weights into their caches (e.g. before going offline)")
    fetch.add_argument("ids", nargs="*", help="model ids (default: every model of the zoo)")
    fetch.add_argument("--zoo", default="paper", help="which zoo (default paper)")
    fetch.set_defaults(func=_cmd_zoo_download)


def _cmd_zoo_list(args) -> int:
    from . import zoo

    print(zoo.summary(args.zoo, replicates=args.seeds).to_string(index=False, na_rep=""))
    return 0


def _cmd_zoo_train(args) -> int:
    import torch

    from .measurement.engine import check_device
    from .zoo.fmnist import train_zoo

    check_device(args.device, "--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_zoo(args.out, methods=args.methods, device=args.device, seed=args.seed, test_images=args.test_images,
              data_root=args.data_root, robust_images=args.robust_images, precision=args.precision,
              force=args.force)
    print(f"zoo written to {args.out}; use it as zoo:fmnist/ID with LAYERCRIT_FMNIST_ZOO={args.out}")
    return 0


def _cmd_zoo_download(args) -> int:
    from . import zoo

    ids = args.ids or [entry["id"] for entry in zoo.entries(args.zoo)]
    failed = 0
    for model_id in ids:
        try:  # resolving fetches what is missing and proves the files load into the architecture
            zoo.resolve(f"zoo:{args.zoo}/{model_id}", pretrained=True)
            print(f"ok      {model_id}")
        except LayercritError as error:  # one model's problem must not stop the others' downloads
            failed += 1
            print(f"failed  {model_id}: {error}")
    print(f"{len(ids) - failed} of {len(ids)} models ready")
    return 1 if failed else 0


# ---------------------------------------------------------------- analyze


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="criticality tables, correlations, figures and an HTML report from results")
    p.add_argument("results", nargs="+", help="results: CSV, Parquet, SQLite store or run folder (layercrit's or "
                                               "the paper's CSV format)")
    p.add_argument("--out", required=True, help="output folder for tables, figures (PNG + PDF) and report.html")
    p.add_argument("--meta", help="model metadata, YAML/JSON/CSV: model_id -> category, display, accuracy, budget")
    p.add_argument("--baseline", help="model_id shown first and subtracted in the delta heatmap "
                                      "(default: the one model of category 'baseline')")
    p.add_argument("--metric", default="cos", help="cos: 100(1 - cos sim of softmax) (default) | top1: "
                                                   "100(1 - recovered acc.) | agreement: 100(1 - agreement)")
    p.add_argument("--reset", help="analyze only the rows of this reset method (needed when results mix several)")
    p.add_argument("--ci-threshold", type=_non_negative_float, default=5.0,
                   help="heatmap cells whose 95%% interval is wider than ± this (points) get a dot (default 5)")
    p.add_argument("--order", default="notebook", choices=["notebook", "metadata"],
                   help="rows: baseline, then categories and model ids alphabetically as the paper's notebook "
                        "(default), or in metadata order")
    p.add_argument("--heatmap-exclude", default="freezing",
                   help="categories left out of the heatmaps, comma separated (default: freezing; '' keeps all)")
    p.add_argument("--no-registry", dest="registry", action="store_false",
                   help="do not take categories, names, accuracies and budgets of known zoo models from the "
                        "bundled registries")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from .analysis.tables import analyze, summary
    from .results import claim_output_folder

    with claim_output_folder(args.out) as out:
        result = analyze(args.results, out, meta=args.meta, baseline=args.baseline, metric=args.metric,
                         reset=args.reset, ci_threshold=args.ci_threshold, order=args.order, registry=args.registry,
                         heatmap_exclude=[c.strip() for c in args.heatmap_exclude.split(",") if c.strip()])
    print(summary(result))
    print(f"tables, figures and report: {result['paths']['report']}")
    return 0


def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="two runs of the same model side by side per layer, with the differences and "
                                    "their 95%% intervals")
    p.add_argument("a", help="results A: run folder, CSV, Parquet or JSON")
    p.add_argument("b", help="results B (difference = B - A)")
    p.add_argument("--out", default="diff.csv", help="CSV to write (default diff.csv)")
    p.set_defaults(func=_cmd_diff)


def _cmd_diff(args) -> int:
    from .analysis.compare import compare
    from .results import read_table, write_table

    table = compare(read_table(args.a), read_table(args.b))
    print("criticality (fraction) ± 95% half-width; difference = B - A, ± sqrt(hA² + hB²); * : interval excludes 0")
    for row in table.itertuples():
        mark = "*" if row.significant else " "
        print(f"  {row.layer:<40} A {row.criticality_a:.4f} ± {row.criticality_ci_a:.4f}  "
              f"B {row.criticality_b:.4f} ± {row.criticality_ci_b:.4f}  "
              f"B-A {row.difference:+.4f} ± {row.difference_ci:.4f} {mark}")
    print(f"{int(table.significant.sum())} of {len(table)} layers differ; table: {write_table(table, args.out)}")
    return 0


# ---------------------------------------------------------------- sweep, status, export


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="measure every model of a YAML config, resumably, into a SQLite store")
    p.add_argument("config", help="sweep config (YAML): data, images, seed, layers, reset, trials, models, ...")
    p.add_argument("--store", help="SQLite store (default runs/CONFIG_NAME.sqlite); a rerun resumes it")
    p.add_argument("--workers", type=_positive_int, help="worker processes / Ray actors (default: one per GPU, else 1 local "
                                               "process or one Ray actor per CPU)")
    p.add_argument("--backend", default="local", choices=["local", "ray"], help="local processes or Ray")
    p.add_argument("--address", help="Ray cluster to join, e.g. ray://head:10001 (default: start a local Ray)")
    p.add_argument("--new-store", action="store_true",
                   help="move an existing store aside (to NAME.old-TIME.sqlite) and start a new one")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve every model (fetching missing weights), count units, report problems; measure nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("overrides of the config")
    g.add_argument("--data", help="image folder (ImageNet-val layout) or 'fashion-mnist'")
    g.add_argument("--data-root", help="folder with the Fashion-MNIST IDX .gz files")
    g.add_argument("--images", type=_positive_int, help="images to evaluate")
    g.add_argument("--cache-dir", help="where decoded evaluation sets are kept")
    g.add_argument("--batch-size", type=_positive_int, help="images per forward (halved automatically when out of memory)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU per worker when there are GPUs)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from .sweeps.store import export_frame, status_frame
    from .sweeps.sweep import load_config, plan_sweep, run_sweep

    config = load_config(args.config, data=args.data, data_root=args.data_root, images=args.images,
                         cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device)
    store = Path(args.store or Path("runs") / f"{Path(args.config).stem}.sqlite")
    if args.dry_run:
        plan = plan_sweep(config, store)
        print(plan.drop(columns="problem").to_string(index=False))
        grid = f"{len(config.reset)} reset(s) x {config.trials} trial(s) x chunks of {config.layers_per_unit} layers"
        print(f"{int(plan.to_run.sum())} of {int(plan.units.sum())} units to run ({grid}); store {store}")
        problems = plan[plan.problem != ""]
        for model_id, problem in zip(problems.model_id, problems.problem, strict=True):
            print(f"cannot measure {model_id}: {problem}")
        return 1 if len(problems) else 0
    if config.log_to:  # a tracker folder that cannot be written fails now, not after the sweep's hours
        from .trackers import check_destination, log_models

        check_destination(config.log_to, store.with_suffix(""))
    run_sweep(config, store, workers=args.workers, backend=args.backend, address=args.address,
              new_store=args.new_store, progress=not args.quiet)
    if config.log_to:  # a model's units run on several workers: its layers are complete only now

        log_models(export_frame(store), config.log_to, config=config.to_dict(), out=store.with_suffix(""))
    status = status_frame(store)
    print_status(status)
    print(f"store: {store}; export with: layercrit export {store} --out results.csv")
    return 1 if status.failed.sum() or (status.error != "").any() else 0


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="done / failed / pending units per model of a sweep store")
    p.add_argument("store", help="the SQLite store of a sweep")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    from .sweeps.store import status_frame

    print_status(status_frame(args.store))
    return 0


def print_status(status) -> None:
    table = status.assign(error=status.error.str.slice(0, 100))
    print(table.to_string(index=False))
    print(f"units: {status.done.sum()} done, {status.failed.sum()} failed, {status.pending.sum()} pending "
          f"of {status.units.sum()}; {(status.units == 0).sum()} model(s) could not be planned")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a sweep store's results table as CSV or Parquet")
    p.add_argument("store", help="the SQLite store of a sweep")
    p.add_argument("--out", required=True, help="results.csv, results.parquet or results.json (records)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .results import write_table
    from .sweeps.store import export_frame

    table = export_frame(args.store)
    path = write_table(table, args.out)
    print(f"{len(table)} rows of {table.model_id.nunique()} model(s) written to {path}")
    return 0


# ---------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="measure the bundled Fashion-MNIST zoo: results, heatmap and report in minutes")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--images", type=_positive_int, default=None, help="test images per model (default: sized for < 5 min)")
    p.add_argument("--trials", type=_positive_int, default=3, help="rerandomizations per layer (default 3)")
    p.add_argument("--models", nargs="+", help="zoo ids to measure (default: the whole zoo)")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: shown on a terminal)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import DEMO_IMAGES, format_summary, run_demo
    from .measurement.engine import check_device
    from .results import claim_output_folder

    check_device(args.device, "--device")
    with claim_output_folder(args.out) as out:
        result = run_demo(out, images=args.images or DEMO_IMAGES, trials=args.trials, models=args.models,
                          batch_size=args.batch_size, device=args.device, data_root=args.data_root,
                          progress=False if args.quiet else None)
    print(format_summary(result["summary"]))
    for name, path in result["paths"].items():
        print(f"{name + ':':<9}{path}")
    return 0


# ---------------------------------------------------------------- module criticality


def _add_module_criticality(sub) -> None:
    p = sub.add_parser("module-criticality",
                       help="Chatterji et al.'s module criticality mu_i(eps) of each layer, given the initial weights")
    add_model_options(p)
    add_data_options(p)
    g = p.add_argument_group("module criticality")
    g.add_argument("--init", required=True, help="checkpoint of the initial weights theta^0 (same architecture)")
    g.add_argument("--layers", default="conv,linear", help="kinds (conv, linear, bn, ln) and/or name globs")
    g.add_argument("--groups", help="treat blocks | stages | FILE groups as the modules")
    g.add_argument("--alphas", help="alpha grid, comma separated (default 0,0.1,...,1)")
    g.add_argument("--sigmas", help="noise std grid, comma separated (default 13 values from 1e-4 to 1)")
    g.add_argument("--sigma-scale", default="relative", choices=["relative", "absolute"],
                   help="relative (default): a module's noise std is sigma x the RMS of its trained weights; "
                        "absolute: sigma in parameter units")
    g.add_argument("--draws", type=_positive_int, default=10, help="noise draws per grid point (default 10)")
    g.add_argument("--criterion", default="loss", choices=["loss", "error"], help="loss (default) or top-1 error")
    g.add_argument("--epsilon", type=float, help="bound on the expected criterion (default: from --epsilon-rule)")
    g.add_argument("--epsilon-rule", default="relative", choices=["relative", "additive"],
                   help="relative (default): epsilon = (1 + tolerance) x trained value; additive: trained + tolerance")
    g.add_argument("--tolerance", type=float, help="see --epsilon-rule (default 0.01 relative, 0.05 additive)")
    g.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the noise")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="fast", choices=["fast", "naive"])
    e.add_argument("--batch-size", type=_positive_int, default=100)
    e.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder for module_criticality.csv and evaluations.csv")
    p.set_defaults(func=_cmd_module_criticality)


def _cmd_module_criticality(args) -> int:
    from .measurement.engine import check_device
    from .results import claim_output_folder

    check_device(args.device, "--device")
    with claim_output_folder(args.out) as out:
        return _module_criticality_into(out, args)


def _module_criticality_into(out: Path, args) -> int:
    from .measurement.module_criticality import DEFAULT_ALPHAS, DEFAULT_SIGMAS, module_criticality
    from .models import resolve_model
    from .results import write_table

    resolved = resolve_model(args.model, arch=args.arch, pretrained=args.pretrained, num_classes=args.num_classes,
                             trust_checkpoint=args.trust_checkpoint, seed=args.seed, model_id=args.model_id)
    table = module_criticality(
        resolved, args.data, init=args.init, layers=args.layers, groups=args.groups,
        alphas=_numbers(args.alphas, "--alphas") or DEFAULT_ALPHAS,
        sigmas=_numbers(args.sigmas, "--sigmas") or DEFAULT_SIGMAS, sigma_scale=args.sigma_scale, draws=args.draws,
        criterion=args.criterion, epsilon=args.epsilon, epsilon_rule=args.epsilon_rule, tolerance=args.tolerance,
        seed=args.seed, images=args.images, model_id=args.model_id,
        trust_checkpoint=args.trust_checkpoint, data_root=args.data_root, cache_dir=args.cache_dir,
        on_evaluations=lambda rows: write_table(rows, out / "evaluations.csv"), batch_size=args.batch_size,
        device=args.device, engine=args.engine, resize=args.resize, crop=args.crop, interpolation=args.interpolation,
        normalize=args.normalize, mean=args.mean, std=args.std,
    )
    path = write_table(table, out / "module_criticality.csv")
    print(table[["layer", "mu", "alpha", "sigma", "noise_std", "distance", "expected"]].to_string(index=False))
    print(f"epsilon {table.epsilon.iloc[0]:.4f} ({args.criterion}); results: {path}")
    return 0


def _numbers(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise LayercritError(f"{flag} {text!r}: give numbers, comma separated") from None


_MEASURING = ("run", "sweep", "demo", "module-criticality")
_SUBCOMMANDS = [_add_run, _add_resets, _add_zoo, _add_analyze, _add_diff, _add_sweep, _add_status, _add_export, _add_demo, _add_module_criticality]


if __name__ == "__main__":
    sys.exit(main())
