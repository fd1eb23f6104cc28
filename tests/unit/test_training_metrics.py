"""The logging window: outputs summed without leaving the device, reduced over ranks by name."""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.metrics import StepTimer
from pixelbert_dist.tracking import Tracker
from pixelbert_dist.config import TrackingConfig
from pixelbert_dist.training_metrics import TrainingMetrics, reduce_by_name
from tests.launch import spawn_ranks


def _reduce_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # the two ranks build their dicts in different orders: a positional reduction would mix them up
    values = {"loss": 1.0 + rank, "skipped": 10.0 * (rank + 1), "accuracy": torch.tensor(0.25 * (rank + 1))}
    if rank == 1:
        values = dict(reversed(list(values.items())))
    queue.put((rank, reduce_by_name(values, torch.device("cpu"))))
    dist.barrier()
    dist.destroy_process_group()


def test_reduce_by_name_sums_each_value_with_its_namesake_on_every_rank():
    results = spawn_ranks(_reduce_worker, 2)
    expected = {"loss": 3.0, "skipped": 30.0, "accuracy": 0.75}
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


def test_the_window_averages_outputs_over_micro_steps_and_keeps_them_as_tensors():
    info = DistInfo(0, 1, 0, torch.device("cpu"), "single")
    metrics = TrainingMetrics(("loss", "accuracy"), StepTimer(), Tracker(TrackingConfig(), enabled=False), info,
                              every=2, logger=logging.getLogger("test"))
    for loss, accuracy in ((2.0, 0.5), (4.0, 1.0)):
        metrics.record(SimpleNamespace(loss=torch.tensor(loss, requires_grad=True), accuracy=torch.tensor(accuracy)),
                       samples=3, images=3)
    # nothing was read back to the host: the sums are (detached) tensors until the window closes
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.sums.values())
    assert not metrics.should_log(1, last=False) and metrics.should_log(2, last=False) and metrics.should_log(3, True)
    logged = metrics.log(2, counters={"skipped_samples": 5}, extra={"epoch": 1})
    assert logged["loss"] == pytest.approx(3.0) and logged["accuracy"] == pytest.approx(0.75)
    assert logged["skipped_samples"] == 5 and logged["epoch"] == 1 and logged["samples_per_s"] > 0
    assert metrics.sums == {} and metrics.micro_steps == 0  # a new window


def test_a_planned_run_reports_progress_then_time_left_and_its_device_hours(caplog):
    info = DistInfo(0, 4, 0, torch.device("cpu"), "single")  # 4 devices: device-hours are 4x wall hours
    metrics = TrainingMetrics(("loss",), StepTimer(), Tracker(TrackingConfig(), enabled=False), info,
                              every=10, logger=logging.getLogger("test.progress"))
    metrics.plan(100, first_step=0, pairs_per_step=8)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        logs = []
        for step in (10, 20):
            metrics.record(SimpleNamespace(loss=torch.tensor(1.0)), samples=8, images=8)
            time.sleep(0.05)
            logs.append(metrics.log(step, counters={}, extra={}))
    first, second = logs
    assert first["run_fraction"] == 0.1 and first["pairs_seen"] == 80 and first["pairs_total"] == 800
    assert "eta_h" not in first  # the first window holds warm-up: no rate from it
    # 10 steps took >= 50 ms: 80 steps left take >= 0.4 s; the run, >= 0.45 s on each of 4 devices
    assert second["eta_h"] * 3600 >= 0.4 and second["projected_device_hours"] * 3600 >= 4 * 0.45
    assert "step 20/100 (20.0%)" in caplog.text and "ETA 0m, run ~0.00 device-hours" in caplog.text


def test_mlflow_gets_metrics_in_sections():
    from pixelbert_dist.tracking import metric_name
    assert [metric_name(k) for k in ("loss", "itm_accuracy", "zeroshot.text_r1", "eval.vqa_accuracy", "mfu",
                                     "samples_per_s", "time.forward_s", "frac.data", "lr.cnn", "eta_h",
                                     "skipped_samples", "data/pairs/coco")] == [
        "train/loss", "train/itm_accuracy", "eval/zeroshot/text_r1", "eval/vqa_accuracy", "perf/mfu",
        "perf/samples_per_s", "phase/forward_s", "phase/data_fraction", "lr/cnn", "progress/eta_h",
        "data/skipped_samples", "data/pairs/coco"]


def test_runs_are_named_time_first_and_linked_to_the_training_view():
    import time as clock

    from pixelbert_dist.tracking import run_name, ui_link
    started = clock.mktime((2026, 12, 5, 9, 14, 7, 0, 0, -1))
    names = [run_name({"job": "pretrain"}, {"model.backbone": "resnet50", "model.num_layers": "12"}, started + dt)
             for dt in (0, 1)]
    assert names[0] == "1205-091407 pretrain resnet50-L12"
    assert names[0][:20] != names[1][:20]  # MLflow's runs table shows about 20 characters
    assert ui_link("http://mlflow.internal:5000/", "3", "abc") == \
        "http://mlflow.internal:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    local = ui_link("sqlite:///runs/mlruns.db", "1", "abc")
    assert local.startswith("`mlflow ui --backend-store-uri sqlite:///runs/mlruns.db`") and local.endswith(
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning")
