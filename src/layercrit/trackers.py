"""Logging a run to an experiment tracker (Weights & Biases, MLflow, TensorBoard) as its rows come in.

A :class:`Tracker` is a ``measure(on_rows=...)`` callback: after every chunk of layers it logs each layer that the
chunk finished, at step = the layer's position in the network, as ``criticality`` with its 95% half-width
``criticality_ci`` and the interval's ends (:func:`layercrit.measurement.estimate.layer_table`), plus ``top1_acc``. The
unmodified model's accuracy and loss go to the run's summary, the options to its config/params, and the whole
layer table, when the run ends, to a ``layers.csv`` (MLflow artifact, W&B table, TensorBoard text).
The sequential design (``target_ci``) adds trials to a layer until its interval is narrow enough, so there
(``sequential=True``) a layer is logged only when the run ends (:meth:`Tracker.close`).

    with layercrit.trackers.Tracker("tensorboard:runs/tb", name="a1", config={"reset": "zero"}) as tracker:
        df = layercrit.measure("timm:resnet50.a1_in1k", "/data/val", on_rows=tracker)
        tracker.close(df)

``layercrit run --log-to wandb|mlflow|tensorboard[:DIR]`` does this. Each tracker is an optional dependency
(``pip install 'layercrit[trackers]'``); where it writes: W&B as configured (``WANDB_MODE=offline`` keeps the run
on disk under DIR, default the current folder; ``WANDB_PROJECT``, default ``layercrit``), MLflow to DIR (a
tracking URI, or a folder used as a file store; default ``MLFLOW_TRACKING_URI`` or MLflow's default;
experiment ``MLFLOW_EXPERIMENT_NAME``, default ``layercrit``), TensorBoard event files in DIR.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .errors import LayercritError
from .measurement.estimate import layer_table
from .names import file_name
from .results import check_output_folder

TRACKERS = ("wandb", "mlflow", "tensorboard")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny", "tensorboard": "tensorboard"}


def parse(log_to: str) -> tuple[str, str | None]:
    """``"tensorboard:runs/tb"`` -> ``("tensorboard", "runs/tb")``; ``"wandb"`` -> ``("wandb", None)``."""
    kind, _, where = log_to.partition(":")
    if kind not in TRACKERS:
        raise LayercritError(f"log_to={log_to!r}: unknown tracker; use one of {', '.join(TRACKERS)} "
                             "(optionally :DIR, e.g. tensorboard:runs/tb)")
    return kind, where or None


class Tracker:
    """Logs a measurement's rows to one tracker; call it with the rows so far, then :meth:`close` it.

    Args:
        log_to: ``wandb``, ``mlflow`` or ``tensorboard``, optionally ``:DIR`` (see the module docstring).
        name: the tracker run's name (e.g. the model id).
        config: the run's options, logged as its config (W&B) or params (MLflow) or as text (TensorBoard).
        out: a run folder: where W&B (``OUT/wandb``) and TensorBoard (``OUT/tensorboard``) write when ``log_to``
            names no DIR (MLflow then uses its tracking URI). None: each tracker's own default.
        sequential: the rows come from the sequential design (``target_ci``): log layers only in :meth:`close`.
    """

    def __init__(self, log_to: str, *, name: str | None = None, config: Mapping | None = None,
                 out: str | Path | None = None, sequential: bool = False) -> None:
        kind, where = check_destination(log_to, out)
        self.backend = _BACKENDS[kind](name, {k: _plain(v) for k, v in (config or {}).items()}, where)
        self.logged: set[tuple] = set()
        self.step = 0
        self.closed = False
        self.sequential = sequential

    def __call__(self, rows: pd.DataFrame) -> None:
        if not self.sequential:  # in the sequential design a layer's estimate is final only when the run ends
            self._log(rows)

    def close(self, rows: pd.DataFrame | None = None) -> None:
        """Log what is left of ``rows`` (the final table), the layer table, and end the tracker's run."""
        if self.closed:
            return
        self.closed = True
        try:
            if rows is not None and len(rows):
                self._log(rows)
                self.backend.table(layer_table(rows))
        finally:
            self.backend.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, rows: pd.DataFrame) -> None:
        if not self.logged:
            original = rows[rows.layer == "original"]
            if len(original):
                first = original.iloc[0]
                self.backend.summary({f"original/{k}": float(first[k]) for k in ("top1_acc", "top5_acc", "loss")
                                      if k in first})
                self.logged.add(("original",))
        table = layer_table(rows)
        top1 = layer_table(rows, value="top1_acc") if "top1_acc" in rows else None
        keys = [c for c in table.columns if c not in ("layer", "criticality", "criticality_ci", "criticality_low",
                                                      "criticality_high", "target_ci", "trials", "images", "capped")]
        several = bool(keys) and len(table[keys].drop_duplicates()) > 1
        depths = table.groupby(keys, sort=False, dropna=False).cumcount() if keys else pd.Series(range(len(table)))
        for i, row in table.iterrows():
            key = (*(row[k] for k in keys), row.layer)
            if key in self.logged:
                continue
            self.logged.add(key)
            # several variants in one run (interpolate: one per alpha) get their own metric names
            prefix = "/".join(str(row[k]) for k in keys if k != "model_id") + "/" if several else ""
            metrics = {"depth": depths[i], "criticality": row.criticality, "criticality_ci": row.criticality_ci,
                       "criticality_low": row.criticality_low, "criticality_high": row.criticality_high}
            if top1 is not None:
                metrics["top1_acc"] = top1.loc[i, "criticality"]  # layer_table's mean of the value it was given
            self.backend.log(self.step, {prefix + k: float(v) for k, v in metrics.items()}, row.layer)
            self.step += 1


def check_destination(log_to: str, out: str | Path | None = None) -> tuple[str, str | None]:
    """The tracker kind and the folder it writes to (``OUT/KIND`` when ``log_to`` names none; None: the tracker's
    default), created and checked: a folder that is a file, read-only or not creatable (``/proc/x``) is one line
    before any work, not a traceback from the tracker's own writer. MLflow's DIR may be a URI: its own errors are
    caught when its run starts."""
    kind, where = parse(log_to)
    if where is None and out is not None and kind != "mlflow":
        where = str(Path(out) / kind)
    if where is not None and kind != "mlflow":
        try:
            check_output_folder(where)
        except LayercritError as error:
            raise LayercritError(f"log_to={kind}:{where}: {error}") from None
    return kind, where


def _plain(value: object) -> object:
    """A config value the trackers take (numbers, strings, booleans; anything else as text)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _import(kind: str):
    import importlib

    try:
        return importlib.import_module({"mlflow": "mlflow.tracking", "tensorboard": "torch.utils.tensorboard"}
                                       .get(kind, kind))
    except ImportError:
        raise LayercritError(f"log_to={kind}: {_PACKAGES[kind]} is not installed; pip install "
                             f"'layercrit[trackers]' (or {_PACKAGES[kind]})") from None


class _Wandb:
    def __init__(self, name: str | None, config: dict, where: str | None) -> None:
        wandb = _import("wandb")
        self.wandb = wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "layercrit"), name=name, config=config,
                                  dir=where, reinit="create_new")
        except Exception as error:  # noqa: BLE001 - wandb raises its own types for login and network problems
            raise LayercritError(f"log_to=wandb: cannot start a W&B run ({str(error).splitlines()[0]}); run "
                                 "'wandb login', or set WANDB_MODE=offline to keep the run on disk") from error

    def log(self, step: int, metrics: dict, layer: str) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def table(self, layers: pd.DataFrame) -> None:
        self.run.summary["layers"] = self.wandb.Table(dataframe=layers)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, name: str | None, config: dict, where: str | None) -> None:
        tracking = _import("mlflow")
        from mlflow.entities import Param

        if where and "://" not in where and not where.startswith(("file:", "sqlite:", "databricks")):
            where = Path(where).resolve().as_uri()  # a folder: MLflow's file store
        try:
            self.client = tracking.MlflowClient(tracking_uri=where)
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "layercrit")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in config.items()])
        except Exception as error:  # noqa: BLE001 - MlflowException and whatever its store raises
            raise LayercritError(f"log_to=mlflow:{where or ''}: cannot start an MLflow run "
                                 f"({str(error).splitlines()[0]})") from error

    def log(self, step: int, metrics: dict, layer: str) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value)

    def table(self, layers: pd.DataFrame) -> None:
        self.client.log_text(self.run_id, layers.to_csv(index=False), "layers.csv")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _TensorBoard:
    def __init__(self, name: str | None, config: dict, where: str | None) -> None:
        tensorboard = _import("tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=where)
        self.writer.add_text("options", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, metrics: dict, layer: str) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.add_text("layer", layer, global_step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=0)

    def table(self, layers: pd.DataFrame) -> None:
        self.writer.add_text("layers.csv", "\n".join("    " + line for line in layers.to_csv(index=False).splitlines()))

    def close(self) -> None:
        self.writer.close()


_BACKENDS = {"wandb": _Wandb, "mlflow": _Mlflow, "tensorboard": _TensorBoard}


def log_models(rows: pd.DataFrame, log_to: str, *, config: Mapping | None = None,
               out: str | Path | None = None) -> None:
    """Log a finished table (a sweep's export) to one tracker run per model, named by its ``model_id``.

    TensorBoard writes each model into its own folder, ``DIR/MODEL_ID`` (default ``OUT/tensorboard/MODEL_ID``), the
    id escaped to one folder name (:func:`layercrit.names.file_name`: ``zoo:fmnist/baseline`` ->
    ``zoo:fmnist%2Fbaseline``), so no id writes outside DIR.
    """
    kind, where = parse(log_to)
    for model_id, model_rows in rows.groupby("model_id", sort=False):
        target = log_to
        if kind == "tensorboard":
            folder = Path(where) if where else Path(out or ".") / "tensorboard"
            target = f"tensorboard:{folder / file_name(str(model_id))}"
        with Tracker(target, name=str(model_id), config=config, out=out) as tracker:
            tracker.close(model_rows)
