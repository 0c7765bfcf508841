"""Logging to experiment trackers: each layer's criticality and interval, at step = its depth, as layers finish;
read back from each tracker's own offline files (TensorBoard events, an MLflow file store, a W&B offline run)."""

import glob
import json
import struct
import time

import pandas as pd
import pytest
import torch

from layercrit import cli, measure
from layercrit.errors import LayercritError
from layercrit.measurement.estimate import layer_table
from layercrit.trackers import Tracker, log_models, parse


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(folder) -> list:
    """The records of a W&B offline run file (LevelDB log format: 32 KiB blocks of checksum, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(f"{folder}/**/run-*.wandb", recursive=True)[0], "rb").read()
    position, block, records, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_records_when_flushed(folder, limit_s: float = 300.0) -> list:
    """The records once W&B's service has written the run's exit record: ``finish()`` may return before its
    separate writer process has flushed the file (a read can even catch a record half written), so wait for that
    event (bounded), never for a fixed time."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + limit_s
    while True:
        try:
            records = wandb_records(folder) if glob.glob(f"{folder}/**/run-*.wandb", recursive=True) else []
        except DecodeError:  # read while the writer was in the middle of a record: not flushed yet
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


class Recorder:
    """A tracker backend that remembers what it was given."""

    def __init__(self):
        self.steps, self.summaries, self.tables, self.closed = [], {}, [], 0

    def log(self, step, metrics, layer):
        self.steps.append((step, layer, metrics))

    def summary(self, values):
        self.summaries.update(values)

    def table(self, layers):
        self.tables.append(layers)

    def close(self):
        self.closed += 1


def test_run_logs_every_layers_criticality_and_interval_to_tensorboard_at_its_depth(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert cli.main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "40",
                     "--layers", "layer3.*,fc", "--trials", "2", "--device", "cpu", "--quiet", "--out", str(out),
                     "--log-to", "tensorboard"]) == 0
    layers = pd.read_csv(out / "layers.csv")
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["criticality"]] == list(range(len(layers)))
    assert [v for _, v in scalars["criticality"]] == pytest.approx(layers.criticality.tolist(), rel=1e-6)
    assert [v for _, v in scalars["criticality_ci"]] == pytest.approx(layers.criticality_ci.tolist(), rel=1e-6)
    assert [v for _, v in scalars["criticality_high"]] == pytest.approx(  # the interval's end, within [0, 1]
        (layers.criticality + layers.criticality_ci).clip(upper=1.0).tolist(), rel=1e-6)
    results = pd.read_csv(out / "results.csv")
    original = results[results.layer == "original"].iloc[0]
    assert scalars["original/top1_acc"] == [(0, pytest.approx(original.top1_acc))]


def test_mlflow_file_store_holds_the_options_and_each_layers_estimate(tmp_path, monkeypatch, tiny_model, tiny_data):
    tracking = pytest.importorskip("mlflow.tracking")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    store = tmp_path / "mlruns"
    with Tracker(f"mlflow:{store}", name="tiny", config={"reset": "rerandomize", "trials": 3}) as tracker:
        df = measure(tiny_model, tiny_data, images=None, trials=3, on_rows=tracker)
        tracker.close(df)
    client = tracking.MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("layercrit").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params == {"reset": "rerandomize", "trials": "3"}
    expected = layer_table(df)
    history = client.get_metric_history(run.info.run_id, "criticality")
    assert [m.step for m in history] == list(range(len(expected)))
    assert [m.value for m in history] == pytest.approx(expected.criticality.tolist())
    widths = [m.value for m in client.get_metric_history(run.info.run_id, "criticality_ci")]
    assert widths == pytest.approx(expected.criticality_ci.tolist())
    assert run.data.metrics["original/top1_acc"] == pytest.approx(df.top1_acc.iloc[0])
    logged = client.download_artifacts(run.info.run_id, "layers.csv", str(tmp_path))
    assert pd.read_csv(logged).layer.tolist() == expected.layer.tolist()


def test_wandb_offline_run_holds_the_options_and_each_layers_estimate(tmp_path, monkeypatch, tiny_model, tiny_data):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker("wandb", name="tiny", config={"reset": "zero"}, out=tmp_path) as tracker:
        df = measure(tiny_model, tiny_data, images=None, reset="zero", trials=2, on_rows=tracker)
        tracker.close(df)
    records = wandb_records_when_flushed(tmp_path / "wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tiny" and run.project == "layercrit"
    assert {i.key: json.loads(i.value_json) for i in run.config.update}["reset"] == "zero"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    expected = layer_table(df)
    assert [h["_step"] for h in history] == list(range(len(expected)))
    assert [h["criticality"] for h in history] == pytest.approx(expected.criticality.tolist())
    assert [h["criticality_ci"] for h in history] == [0.0] * len(expected)  # zero is one computation per layer


def test_layers_are_logged_as_their_chunk_finishes_not_at_the_end(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker("tensorboard", out=tmp_path)
    tracker.backend = recorder = Recorder()
    seen = []
    # max_cache_mb=0: every layer is its own chunk of the fast engine
    df = measure(tiny_model, tiny_data, images=None, trials=2, max_cache_mb=0,
                 on_rows=lambda rows: (tracker(rows), seen.append(len(recorder.steps))))
    assert seen == [1, 2, 3, 4]  # one more layer after each chunk
    assert [layer for _, layer, _ in recorder.steps] == ["model.conv1", "model.conv2", "model.unused", "model.fc"]
    assert recorder.summaries["original/top1_acc"] == df.top1_acc.iloc[0]
    tracker.close(df)
    tracker.close(df)
    assert len(recorder.steps) == 4 and recorder.closed == 1 and len(recorder.tables) == 1


def test_the_sequential_design_logs_its_layers_only_when_the_run_ends(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker("tensorboard", out=tmp_path, sequential=True)
    tracker.backend = recorder = Recorder()
    images, labels = tiny_data
    twice = (torch.cat([images, images]), torch.cat([labels, labels]))  # the pilot's 6 blocks of 16 images
    df = measure(tiny_model, twice, images=None, layers="fc", trials=3, target_ci=0.5, max_trials=6,
                 images_per_trial=16, on_rows=tracker)
    assert recorder.steps == []  # its intervals change with every trial
    tracker.close(df)
    ((_, layer, metrics),) = recorder.steps
    assert layer == "model.fc" and metrics["criticality_ci"] == layer_table(df).criticality_ci.item()


def test_a_sweeps_table_is_logged_one_tensorboard_folder_per_model(tmp_path):
    pytest.importorskip("tensorboard")
    rows = pd.DataFrame({"model_id": ["a"] * 3 + ["b"] * 3, "layer": ["original", "fc", "fc"] * 2,
                         "trial": [0, 0, 1] * 2, "criticality": [0, 0.2, 0.4, 0, 0.6, 0.6],
                         "top1_acc": [90.0, 50, 40, 80.0, 30, 30]})
    log_models(rows, "tensorboard", out=tmp_path)
    a, b = (tensorboard_scalars(tmp_path / "tensorboard" / m) for m in "ab")
    assert a["criticality"] == [(0, pytest.approx(0.3))] and b["criticality"] == [(0, pytest.approx(0.6))]
    assert a["criticality_ci"][0][1] == pytest.approx(12.706 * 0.1, rel=1e-4)  # t(0.975, 1) * s / sqrt(2)
    assert b["original/top1_acc"] == [(0, 80.0)]


def test_an_unknown_tracker_or_a_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    with pytest.raises(LayercritError, match=r"log_to='neptune': unknown tracker; use one of wandb, mlflow"):
        parse("neptune")
    assert parse("tensorboard:runs/tb") == ("tensorboard", "runs/tb")
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(LayercritError, match=r"wandb is not installed; pip install 'layercrit\[trackers\]'"):
        Tracker("wandb", out=tmp_path)
    code = cli.main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--out", str(tmp_path),
                     "--log-to", "neptune", "--images", "10"])
    assert code == 2
