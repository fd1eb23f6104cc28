"""Fine-tuning for real: synthetic task shards -> DeepSpeed -> evaluation -> MLflow."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch

from data_pipeline import shard
from data_pipeline.sources import SourceSpec, read_records
from data_pipeline.synthetic_tasks import generate_tasks, write_retrieval
from pixelbert_dist.config import FinetuneConfig, TaskConfig, load_config
from pixelbert_dist.tokenizer import train_wordpiece
from tests.conftest import mlflow_metrics as _metrics
from tests.launch import REPO, run_job

CONFIG = REPO / "configs" / "finetune" / "tiny-cpu.yaml"
PRETRAINED = REPO / "tests" / "data" / "pretrained-tiny"  # make demo's checkpoint, exported (see its README)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, ray_local):
    """Each synthetic task's train and held-out split, sharded; a vocab over all their texts."""
    root = tmp_path_factory.mktemp("finetune")
    specs = generate_tasks(root / "raw", 24, seed=3, min_side=128, max_side=256)
    del specs["retrieval"]  # retrieval has its own, larger data below
    out, texts = {}, []
    for task, (train, *_, held_out) in specs.items():
        for split, spec in (("train", train), ("eval", held_out)):
            assert shard.main(["--source", spec, "--out", str(root / f"{task}-{split}"), "--shard-size", "32",
                               "--no-progress"]) == 0
            texts += [t for record in read_records(SourceSpec.parse(spec)) for t in record.captions]
        out[task] = (root / f"{task}-train", root / f"{task}-eval")
    vocab = train_wordpiece(texts, 200, root / "vocab")
    return out, vocab, root / "raw"


def _argv(tasks, task: str, workdir: Path, **overrides) -> list[str]:
    shards, vocab, raw = tasks
    settings = {
        "task.name": task, "data.train_manifest": shards[task][0], "data.eval_manifest": shards[task][1],
        "data.tokenizer": vocab, "data.num_workers": 0, "train.global_batch_size": 16, "train.micro_batch_size": 8,
        "train.max_steps": 4, "train.log_every": 1, "checkpoint.dir": workdir / "ckpt",
        "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}", "deepspeed.config": REPO / "configs/deepspeed/zero2.json",
    }
    if task == "vqa":
        settings["task.answer_vocab"] = raw / "vqa" / "answers.json"
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", str(CONFIG)] + [f"--{k}={v}" for k, v in settings.items()]


def _run(nproc: int, argv: list[str], workdir: Path) -> subprocess.CompletedProcess:
    return run_job("finetune", argv, workdir, nproc, launcher="torchrun" if nproc > 1 else "python")


def _export(tasks, path: Path) -> Path:
    """A tiny "pre-trained" Pixel-BERT in the export format (random weights: only loading is tested)."""
    from safetensors.torch import save_model

    from pixelbert_dist.export import CONFIG as EXPORT_CONFIG, WEIGHTS
    from pixelbert_dist.model import PixelBert

    cfg = load_config(CONFIG, [f"--model.vocab_size={len(tasks[1].read_text().split())}"], schema=FinetuneConfig)
    torch.manual_seed(5)
    path.mkdir(parents=True)
    save_model(PixelBert(cfg.model), str(path / WEIGHTS))
    (path / EXPORT_CONFIG).write_text(json.dumps(cfg.to_dict()))
    return path


@pytest.mark.slow
def test_vqa_on_two_ranks_from_an_export_answers_every_held_out_question(tasks, tmp_path):
    init = _export(tasks, tmp_path / "pretrained")
    done = _run(2, _argv(tasks, "vqa", tmp_path, task__init=init, task__predictions=tmp_path / "answers.json"),
                tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"starting from {init}" in done.stderr
    metrics = _metrics(tmp_path / "mlruns.db")
    assert [s for s, _ in metrics["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in metrics["eval/vqa_accuracy"]] == [4]
    assert all(0 < v < 1 for _, v in metrics["perf/mfu"])  # fine-tuning counts its FLOPs too
    assert 0 <= metrics["eval/vqa_accuracy"][0][1] <= 100
    # every held-out question answered exactly once, from the vocabulary, over both ranks
    raw = tasks[2] / "vqa"
    questions = json.loads(next(raw.glob("v2_OpenEnded_mscoco_val*_questions.json")).read_text())["questions"]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert sorted(a["question_id"] for a in answers) == sorted(q["question_id"] for q in questions)
    assert {a["answer"] for a in answers} <= set(json.loads((raw / "answers.json").read_text()))
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        params = dict(con.execute("select key, value from params").fetchall())
    assert params["task.name"] == "vqa" and params["world_size"] == "2"
    # the MLflow `model/` artifact is the fine-tuned model, head and answer vocabulary included
    from pixelbert_dist.export import load_exported

    logged = [p.parent for p in tmp_path.rglob("model/model.safetensors")]
    assert len(logged) == 1, sorted(map(str, tmp_path.rglob("*")))[:50]
    model = load_exported(logged[0])
    assert type(model).__name__ == "PixelBertForVQA" and model.tokenizer is not None
    assert list(model.answers) == json.loads((raw / "answers.json").read_text())


@pytest.mark.slow
def test_nlvr2_trains_evaluates_and_resumes_into_the_same_run(tasks, tmp_path):
    # (retrieval trains and evaluates in the pre-trained-vs-scratch test below)
    done = _run(1, _argv(tasks, "nlvr2", tmp_path, checkpoint__every_steps=2, train__max_steps=2), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = _run(1, _argv(tasks, "nlvr2", tmp_path, train__max_steps=4) + ["--resume", "auto"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = _metrics(tmp_path / "mlruns.db")
    assert [s for s, _ in metrics["train/loss"]] == [1, 2, 3, 4]  # one MLflow run, continued
    assert [s for s, _ in metrics["eval/nlvr2_accuracy"]] == [2, 4]
    assert 0 <= metrics["eval/nlvr2_accuracy"][-1][1] <= 100
    assert all(0 < v < 1 for _, v in metrics["perf/mfu"])
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        tags = dict(con.execute("select key, value from tags").fetchall())
    assert tags["launcher"] == "single" and tags["job"] == "nlvr2"  # a plain process, not "deepspeed"


def test_config_faults_are_named_before_training(tmp_path):
    from pixelbert_dist.tasks.base import pretrained_model_config

    with pytest.raises(ValueError, match="task.init=.*nowhere"):
        pretrained_model_config(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="task.hard_negatives"):
        TaskConfig(name="retrieval", negatives=3, hard_negatives=5)
    with pytest.raises(ValueError, match="task.answer_vocab"):
        load_config(CONFIG, ["--task.name=vqa"], schema=FinetuneConfig)


@pytest.fixture(scope="module")
def retrieval_split(tmp_path_factory, ray_local):
    """Synthetic retrieval: its train split and a 20-image test split, sharded."""
    root = tmp_path_factory.mktemp("retrieval")
    train, _, test = write_retrieval(root / "raw", 200, 7, 192, 448)
    for name, spec in (("train", train), ("test", test)):
        assert shard.main(["--source", spec, "--out", str(root / name), "--shard-size", "100", "--max-short-side",
                           "128", "--max-long-side", "192", "--no-progress"]) == 0
    return root / "train", root / "test"


@pytest.mark.slow
def test_fine_tuning_from_the_pretrained_model_beats_fine_tuning_from_scratch(retrieval_split, tmp_path):
    """The same budget, config and seed from pre-trained weights and from random ones:
    retrieval with the CNN frozen, ranked over the held-out images."""
    scores = {}
    for init in (str(PRETRAINED), ""):
        workdir = tmp_path / ("pretrained" if init else "scratch")
        argv = ["--config", str(CONFIG), "--task.name=retrieval", "--task.freeze_cnn=true", f"--task.init={init}",
                f"--data.train_manifest={retrieval_split[0]}", f"--data.eval_manifest={retrieval_split[1]}",
                f"--data.tokenizer={PRETRAINED / 'vocab.txt'}", "--data.num_workers=0", "--train.max_steps=40",
                f"--checkpoint.dir={workdir / 'ckpt'}", f"--tracking.uri=sqlite:///{workdir / 'mlruns.db'}",
                f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}"]
        done = _run(1, argv, workdir)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics = _metrics(workdir / "mlruns.db")
        assert metrics["eval/images"][-1][1] == 20 and metrics["eval/captions"][-1][1] == 100
        scores[init or "scratch"] = metrics["eval/r_mean"][-1][1]
    # measured: 46.5 vs 25.0 (chance ~27); 5 points of margin against a flaky pass
    assert scores[str(PRETRAINED)] > scores["scratch"] + 5.0, scores
