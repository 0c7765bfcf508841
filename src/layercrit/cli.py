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
from .errors import LayercritError, show_warning


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
            warnings.showwarning = show_warning
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


def _seed(text: str) -> int:
    """argparse type: a seed in the range torch and the store hold (``measure.SEED_RANGE``)."""
    from .spec import SEED_RANGE

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"give a whole number from -2**63 to 2**63-1, not {text!r}")
    return value


def as_flags(message: str) -> str:
    """The library names its parameters (``bn='x': ...``); on the command line they are flags (``--bn='x': ...``)."""
    from .spec import FIELDS

    names = "|".join(sorted([*FIELDS, *_LIBRARY_ONLY], key=len, reverse=True))
    message = re.sub(rf"(?<![\w-])({names})=", lambda m: f"--{m.group(1).replace('_', '-')}=", message)
    return re.sub(r"(--[\w-]+)=True\b", r"\1", message)  # force=True is the flag --force


_LIBRARY_ONLY = ("drop", "out", "force")  # parameters of library functions (prune) that are flags but no spec field


# ---------------------------------------------------------------- shared options


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="timm:NAME[.TAG] | hf-hub:ORG/NAME | torchvision:NAME[:WEIGHTS] | "
                   "hf:ORG/NAME (transformers) | hf:DIR (save_pretrained) | zoo:ZOO/ID | MODULE:FACTORY | "
                   "FILE.py:FACTORY (imports and runs that code) | CKPT")
    g.add_argument("--arch", help="architecture of a checkpoint: timm:NAME | hf-hub:ORG/NAME | torchvision:NAME | "
                   "layercrit:NAME | MODULE:FACTORY | FILE.py:FACTORY")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init instead of weights")
    g.add_argument("--num-classes", type=_positive_int, help="classes of a checkpoint's head (default: read from the file)")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints holding pickled objects")
    g.add_argument("--model-id", help="name for the model in results (default: the spec)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of an hf: model's weights (default float32)")


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
    g.add_argument("--seed", type=_seed, default=0, help="seed of the image subset and of the random resets")
    g.add_argument("--data-seed", type=_seed, default=-1, help="seed of the image subset alone, so the same images "
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
    g.add_argument("--max-trials", type=_positive_int, help="with --target-ci: most trials per layer (100)")
    g.add_argument("--images-per-trial", type=_positive_int, help="with --target-ci: images per trial after the pilot "
                   "(default: Cochran's rule on the pilot's variance components)")
    g.add_argument("--no-mirror", dest="mirror", action="store_false", help="with --target-ci: single reset draws only "
                   "(default: mirrored pairs W, -W where the init is symmetric and the pilot shows they pay)")
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
                                                      "set) or 'fashion-mnist-train'; text for a language model: "
                                                      "FILE.txt | FILE.jsonl | hf-dataset:REPO[/CONFIG][:SPLIT] | "
                                                      "python-stdlib")
    g.add_argument("--data-root", help="folder with the Fashion-MNIST IDX .gz files")
    g.add_argument("--images", "--windows", dest="images", type=_positive_int, default=10_000,
                   help="images (or text windows) to evaluate, a seeded subset (default 10000, as the paper)")
    g.add_argument("--seq-len", type=_positive_int, help="text: tokens per window (default: the model's context, at "
                   "most 128)")
    g.add_argument("--text-field", default="text", help="text: the JSON key / dataset column with the text")
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
    experiment = experiment_from_args(args)  # option mistakes are found before the folder is claimed
    with claim_output_folder(args.out) as out:
        df, csv_path = _run_into(out, args, experiment)
    for reset, rows in df.groupby("reset", sort=False):  # interpolate: one summary per alpha
        if df.reset.nunique() > 1:
            print(f"reset {reset}:")
        print_summary(rows)
    print(f"results: {csv_path}, {csv_path.with_suffix('.parquet')} and {csv_path.with_suffix('.json')}")
    return 0


def _run_into(out: Path, args, experiment):
    """Measure ``experiment`` into ``out`` (held by this process); the results table and the path of results.csv.

    run.json says ``"complete": false`` beside every chunk's results and ``true`` beside the final ones (renamed
    into place last), so a reader can tell a finished folder from one that a kill interrupted.
    """
    from .measurement.memory import estimate_memory, memory_warning
    from .measurement.prepare import execute, prepare
    from .resolve import resolve_model
    from .results import write_results

    resolved = resolve_model(args.model, arch=args.arch, dtype=args.dtype, pretrained=args.pretrained,
                             num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint, seed=args.seed,
                             model_id=args.model_id)
    # run.json goes with the results it describes: a run that fails before its first results leaves the folder as is
    run = {**{k: v for k, v in vars(args).items() if k != "func"}, "max_trials": experiment.max_trials,
           "spec_id": experiment.spec_id()}
    tracker = None
    if experiment.log_to:  # its folder is checked before any work
        from .trackers import Tracker

        tracker = Tracker(experiment.log_to, name=args.model_id or resolved.spec, config=run, out=out,
                          sequential=experiment.sequential)
    prepared = prepare(resolved, spec=experiment, model_id=args.model_id, trust_checkpoint=args.trust_checkpoint)
    print(prepared.describe())
    memory = estimate_memory(prepared)
    print(memory.line(prepared.options.device))
    short = memory_warning(memory, prepared.options.device, text=prepared.model.tokenizer is not None)
    if short:
        warnings.warn(short, UserWarning, stacklevel=1)
    run.update(preprocessing=prepared.inputs(), task=prepared.task.name,
               memory=memory.as_dict(prepared.options.device))

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
    from .spec import FIELDS, RESET_SHORTHANDS, Experiment, check_needs, with_shorthands

    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    check_needs(values)
    values["max_trials"] = args.max_trials or Experiment.max_trials  # None: not given
    values["bn"] = " ".join(args.bn)
    out = Path(getattr(args, "out", None) or ".")  # the run's outputs go into its folder
    values["save_logits"] = str(out / "logits") if args.save_logits else None
    values["per_class"] = str(out / "per_class.csv") if args.per_class else None
    values["reset"] = with_shorthands(args.reset, {name: getattr(args, name, None) for name in RESET_SHORTHANDS})
    return Experiment(**values)


def print_summary(df) -> None:
    from .measurement.aggregate import interval_text
    from .measurement.estimate import layer_table

    original = df[df.layer == "original"].iloc[0]
    skipped = int(original.n_skipped)
    print(f"original: top-1 {original.top1_acc:.2f}%  top-5 {original.top5_acc:.2f}%  loss {original.loss:.4f} "
          f"on {int(original.n_images)} images" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    layers = layer_table(df)
    if layers.empty:
        return
    print("most critical layers (criticality = 1 - cos sim of softmax, fraction; ± 95% interval over resets, "
          "[low, high] where it is clipped to [0, 1]):")
    for _, row in layers.sort_values("criticality", ascending=False).head(10).iterrows():
        capped = "  (hit --max-trials)" if row.capped else ""
        interval = interval_text(row.criticality, row.criticality_ci, row.criticality_low, row.criticality_high)
        print(f"  {row.layer:<40} {interval}  ({row.trials} resets, {row.images} images){capped}")
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
    train = zoo_sub.add_parser("train", help="train the Fashion-MNIST zoo or the language-model zoo (seeded) into a "
                               "folder")
    train.add_argument("zoo", nargs="?", default="fmnist", choices=["fmnist", "lm"],
                       help="fmnist (default) or lm (tiny GPT-2s on Python's standard library; needs [lm])")
    train.add_argument("--methods", nargs="+", help="ids, methods or categories to train (default: all)")
    train.add_argument("--out", help="zoo folder to write (default runs/zoo-fmnist or runs/zoo-lm)")
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    train.add_argument("--threads", type=_positive_int, help="CPU threads for torch (the shipped zoo used 2)")
    train.add_argument("--seed", type=_seed, default=0, help="seed of init, batch order and augmentation")
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
    out = args.out or f"runs/zoo-{args.zoo}"
    if args.zoo == "lm":
        from .zoo.lm import train_zoo as train_lm_zoo

        train_lm_zoo(out, methods=args.methods, device=args.device, seed=args.seed, force=args.force)
        print(f"zoo written to {out}; use it as zoo:lm/ID with LAYERCRIT_LM_ZOO={out}")
        return 0
    train_zoo(out, methods=args.methods, device=args.device, seed=args.seed, test_images=args.test_images,
              data_root=args.data_root, robust_images=args.robust_images, precision=args.precision,
              force=args.force)
    print(f"zoo written to {out}; use it as zoo:fmnist/ID with LAYERCRIT_FMNIST_ZOO={out}")
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
    p.add_argument("--no-pdf", dest="pdf", action="store_false",
                   help="write the figures as PNG only (the PDFs take half of the figures' time)")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from .analysis.tables import analyze, summary
    from .results import claim_output_folder

    with claim_output_folder(args.out) as out:
        result = analyze(args.results, out, meta=args.meta, baseline=args.baseline, metric=args.metric,
                         reset=args.reset, ci_threshold=args.ci_threshold, order=args.order, registry=args.registry,
                         heatmap_exclude=[c.strip() for c in args.heatmap_exclude.split(",") if c.strip()],
                         pdf=args.pdf)
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
    from .analysis.compare import check_comparable, compare, conditions, mean_difference
    from .measurement.aggregate import interval_text
    from .results import read_table, write_table

    a, b = read_table(args.a), read_table(args.b)
    check_comparable(a, b)
    table = compare(a, b)
    made = conditions(a, b)
    differ = [c for c in made if c.differs]
    print("A and B differ in: " + ("; ".join(f"{c.name} ({c.a} -> {c.b})" for c in differ) if differ else
                                   "nothing the rows record"))
    if any(c.name == "data" and c.differs for c in made):
        print("warning: A and B were measured on different images: the difference includes image sampling and "
              "cannot be paired")
    measured = table[table.difference.notna()]
    paired = int(measured.paired.sum())
    if paired == len(measured):
        print("paired: A and B share their reset draws and images (seed, trials, image blocks); B - A ± the "
              "t-interval of the per-trial differences")
    elif measured.shared_trials.sum() == 0:
        print("unpaired: A and B share no trial (other seed, images or image blocks); B - A ± Welch's interval of "
              "two independent estimates")
    else:
        print(f"partly paired: A and B share {int(measured.shared_trials.sum())} of their trials (same draw, same "
              "images; in the sequential design the pilot's, unless --images-per-trial fixed one block size for "
              "both); the shared trials enter paired, the others independent")
    print("criticality (fraction) ± 95% half-width ([low, high] where clipped); * : the interval of B - A excludes 0")
    for row in table.itertuples():
        mark = "*" if row.significant else " "
        print(f"  {row.layer:<40} A {row.criticality_a:.4f} ± {row.criticality_ci_a:.4f}  "
              f"B {row.criticality_b:.4f} ± {row.criticality_ci_b:.4f}  "
              f"B-A {interval_text(row.difference, row.difference_ci, row.difference_low, row.difference_high)}"
              f" {mark}")
    mean = mean_difference(a, b)
    print(f"mean over the {len(measured)} layers both measured: B-A "
          f"{interval_text(mean.value, mean.half_width, mean.low, mean.high)}"
          f"{' *' if mean.excludes_zero else ''}")
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
    p.add_argument("--allow-code", action="store_true", help="run the Python code the config names: MODULE:FACTORY "
                   "and FILE.py:FACTORY specs or archs, trust_checkpoint: true (refused without it; a dry run "
                   "never runs it)")
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
        plan = plan_sweep(config, store, allow_code=args.allow_code)
        print(plan.drop(columns="problem").to_string(index=False))
        grid = f"{len(config.reset)} reset(s) x {config.trials} trial(s) x chunks of {config.layers_per_unit} layers"
        print(f"{int(plan.to_run.sum())} of {int(plan.units.sum())} units to run ({grid}); store {store}")
        unbuilt = plan.model_id[plan.units.isna()]
        if len(unbuilt):
            print(f"not built (a dry run runs no code from the config): {', '.join(unbuilt)}")
        problems = plan[plan.problem != ""]
        for model_id, problem in zip(problems.model_id, problems.problem, strict=True):
            print(f"cannot measure {model_id}: {problem}")
        return 1 if len(problems) else 0
    if config.log_to:  # a tracker folder that cannot be written fails now, not after the sweep's hours
        from .trackers import check_destination, log_models

        check_destination(config.log_to, store.with_suffix(""))
    run_sweep(config, store, workers=args.workers, backend=args.backend, address=args.address,
              new_store=args.new_store, progress=not args.quiet, allow_code=args.allow_code)
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
    p = sub.add_parser("demo", help="measure the bundled Fashion-MNIST zoo (or, with --task lm, the language-model "
                       "zoo): results, heatmap and report in minutes")
    p.add_argument("--task", choices=["image", "lm"], default="image", help="image: the Fashion-MNIST zoo, every "
                   "layer rerandomized (default); lm: the language-model zoo, every block skipped, with Block "
                   "Influence and angular distance beside it (needs the [lm] extra)")
    p.add_argument("--out", help="output folder (default runs/demo, or runs/demo-lm)")
    p.add_argument("--windows", type=_positive_int, help="--task lm: held-out windows per model (default 96)")
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
    if args.task == "lm":
        from .demo import LM_WINDOWS, run_lm_demo

        with claim_output_folder(args.out or "runs/demo-lm") as out:
            result = run_lm_demo(out, windows=args.windows or LM_WINDOWS, models=args.models, device=args.device,
                                 progress=False if args.quiet else None)
        print(result["summary"].to_string(index=False))
        print("Spearman rho across blocks (95% interval) of each proxy with what skipping the block does:")
        print(result["proxies"].to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
        for name, path in result["paths"].items():
            print(f"{name + ':':<9}{path}")
        return 0
    with claim_output_folder(args.out or "runs/demo") as out:
        result = run_demo(out, images=args.images or DEMO_IMAGES, trials=args.trials, models=args.models,
                          batch_size=args.batch_size, device=args.device, data_root=args.data_root,
                          progress=False if args.quiet else None)
    print(format_summary(result["summary"]))
    for name, path in result["paths"].items():
        print(f"{name + ':':<9}{path}")
    return 0


# ---------------------------------------------------------------- prune


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="write a transformers language model without some blocks (save_pretrained) "
                       "and report its perplexity before and after")
    p.add_argument("--model", required=True, help="hf:ORG/NAME | hf:DIR | zoo:lm/ID (a causal language model)")
    p.add_argument("--drop", required=True, help="blocks to remove: 3,5 or 2-4 (0 is the first; -1 the last)")
    p.add_argument("--out", required=True, help="folder to write the pruned model and its tokenizer to")
    p.add_argument("--data", default="python-stdlib", help="evaluation text: FILE.txt | FILE.jsonl | "
                   "hf-dataset:REPO[/CONFIG][:SPLIT] | python-stdlib (default: held-out standard-library modules)")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per window (default: the model's context, at most 128)")
    p.add_argument("--windows", "--images", dest="windows", type=_positive_int, default=64,
                   help="evaluation windows, a seeded subset (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window subset")
    p.add_argument("--text-field", default="text", help="the JSON key / dataset column with the text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args) -> int:
    from .measurement.engine import check_device
    from .prune import prune

    check_device(args.device, "--device")
    result = prune(args.model, args.drop, args.out, data=args.data, seq_len=args.seq_len, windows=args.windows,
                   seed=args.seed, text_field=args.text_field, dtype=args.dtype, device=args.device, force=args.force)
    dropped = ",".join(map(str, result.dropped))
    print(f"dropped blocks {dropped} of {result.blocks_before} ({result.container}); wrote {result.out}")
    print(f"perplexity on {result.data}: {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}")
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
    g.add_argument("--seed", type=_seed, default=0, help="seed of the image subset and of the noise")
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
    from .resolve import resolve_model
    from .results import write_table

    resolved = resolve_model(args.model, arch=args.arch, dtype=args.dtype, pretrained=args.pretrained,
                             num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint, seed=args.seed,
                             model_id=args.model_id)
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


_MEASURING = ("run", "sweep", "demo", "module-criticality", "prune")
_SUBCOMMANDS = [_add_run, _add_resets, _add_zoo, _add_analyze, _add_diff, _add_sweep, _add_status, _add_export, _add_demo, _add_prune, _add_module_criticality]


if __name__ == "__main__":
    sys.exit(main())
