"""What a newcomer meets after pre-training: fine-tuned models that export and load with their
head, and a checkpoint folder that belongs to one run.

One process saves, through a real ZeRO-2 engine and the Checkpointer's own save(), a checkpoint of
each task model fine-tuned from the shipped tiny export, plus one step 3 into a folder already
holding an earlier run's steps 5 and 8 (keep_last=1)."""

import json
import subprocess
import sys

import pytest
import torch

from pixelbert_dist import checkpoint, export, tasks
from pixelbert_dist.config import CheckpointConfig
from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.model import PixelBert
from tests.launch import REPO, job_env

PRETRAINED = REPO / "tests" / "data" / "pretrained-tiny"
ANSWERS = ["yes", "no", "two", "red"]

SAVE_TASK_CHECKPOINTS = """
import sys
from pathlib import Path
import torch
from pixelbert_dist import checkpoint, distributed
from pixelbert_dist.config import FinetuneConfig, load_config
from pixelbert_dist.engine import build_engine
from pixelbert_dist.tasks import TASKS

pretrained, answers, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
distributed.init()
ds_config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
             "zero_allow_untested_optimizer": True}
for name in ("vqa", "nlvr2", "retrieval"):
    cfg = load_config("configs/finetune/tiny-cpu.yaml", [f"--task.name={name}", f"--task.init={pretrained}",
                      f"--task.answer_vocab={answers}", f"--checkpoint.dir={root / name}"], schema=FinetuneConfig)
    spec = TASKS[name]
    run = spec.resolve(cfg, spec.tokenizer(cfg))
    model = spec.build_model(run, True)
    torch.manual_seed(1)
    with torch.no_grad():  # a head that is not its initial one
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    engine = build_engine(model, torch.optim.AdamW(model.parameters()), None, ds_config)
    checkpoint.save(engine, root / name, 7, {"config": run.cfg.to_dict(), "epoch": 0}, keep_last=1, is_main=True)
    if name == "retrieval":  # a used folder: an earlier run's steps 5 and 8, then this run's step 3
        checkpoint.save(engine, root / "used", 5, {"config": run.cfg.to_dict(), "epoch": 0}, 2, True)
        checkpoint.save(engine, root / "used", 8, {"config": run.cfg.to_dict(), "epoch": 0}, 2, True)
        checkpoint.save(engine, root / "used", 3, {"config": run.cfg.to_dict(), "epoch": 0}, 1, True)
distributed.finish(0)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-checkpoints")
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    done = subprocess.run([sys.executable, "-c", SAVE_TASK_CHECKPOINTS, str(PRETRAINED), str(root / "answers.json"),
                           str(root)], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("name,model_class", [("vqa", "PixelBertForVQA"), ("nlvr2", "PixelBertForNLVR2"),
                                              ("retrieval", "PixelBertForRetrieval")])
def test_a_fine_tuned_checkpoint_exports_and_loads_with_its_head(saved, name, model_class, tmp_path):
    ckpt = saved / name / "step00000007"
    from_checkpoint = export.load_exported(ckpt)
    assert export.main([str(ckpt), str(tmp_path / "out")]) == 0
    exported = export.load_exported(tmp_path / "out")
    for model in (from_checkpoint, exported):
        assert type(model).__name__ == model_class and not model.training
        assert model.tokenizer is not None and len(model.tokenizer) == 114  # the pre-trained model's
        assert model.answers == (tuple(ANSWERS) if name == "vqa" else ())
    ours, theirs = from_checkpoint.state_dict(), exported.state_dict()
    assert ours.keys() == theirs.keys() and any(k.startswith("head.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the head is the trained one, not a fresh initialisation
    fresh = type(exported)(exported.body.cfg, exported.task, len(exported.answers))
    assert not torch.equal(fresh.state_dict()["head.weight" if name == "retrieval" else "head.0.weight"],
                           ours["head.weight" if name == "retrieval" else "head.0.weight"])
    # save_pretrained again: the same folder contents back
    again = tasks.from_pretrained(exported.save_pretrained(tmp_path / "again"))
    assert all(torch.equal(again.state_dict()[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match=f"fine-tuned {name} model .*load_exported"):
        PixelBert.from_pretrained(tmp_path / "out")


def test_pruning_never_removes_a_checkpoint_newer_than_the_runs_own(saved):
    # step 3 saved with keep_last=1 into a folder holding 5 and 8: pruning took 3 and 5, leaving only 8
    assert checkpoint.complete_tags(saved / "used") == ["step00000003", "step00000005", "step00000008"]


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(saved):
    used = saved / "used"
    before = sorted(p.relative_to(used) for p in used.rglob("*"))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launcher="single")
    with pytest.raises(ValueError, match=f"checkpoint.dir {used} holds another run's checkpoints \\(step00000003, "
                                         f"step00000005, step00000008\\); continue that run with --resume auto, "
                                         f"or give this one a new folder"):
        checkpoint.Checkpointer(CheckpointConfig(dir=str(used)), info, None, seed=0)
    assert sorted(p.relative_to(used) for p in used.rglob("*")) == before  # nothing removed or written
    resumed = checkpoint.Checkpointer(CheckpointConfig(dir=str(used)), info, "auto", seed=0)
    assert resumed.found == (used, "step00000008")


def test_the_first_training_command_without_its_vocab_says_how_to_make_one(tmp_path):
    """`pretrain --help`'s tiny example from another folder before the tokenizer step: a clear
    error naming the vocab and the command that makes it, before any work (nothing written)."""
    import time

    from tests.launch import run_job

    started = time.monotonic()
    done = run_job("pretrain", ["--config", REPO / "configs/pretrain/tiny-cpu.yaml",
                                "--data.train_manifest=data/shards", f"--tracking.uri=sqlite:///{tmp_path}/mlruns.db"],
                   tmp_path / "elsewhere", launcher="python", timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("tokenizer data/synthetic/vocab.txt: no such file or folder" in done.stderr
            and "python -m pixelbert_dist.tokenizer --captions" in done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "random_ expects" not in done.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tmp_path / "mlruns.db").exists()
    assert time.monotonic() - started < 60


def test_a_fine_tuned_model_as_task_init_is_named(saved):
    from pixelbert_dist.config import ConfigError
    from pixelbert_dist.tasks.base import pretrained_model_config

    with pytest.raises(ConfigError, match="a fine-tuned vqa model; start from the pre-trained one"):
        pretrained_model_config(str(saved / "vqa" / "step00000007"))


def test_more_eval_folds_than_the_test_set_can_hold_warns_and_reports_all_images_only(caplog):
    import logging

    from pixelbert_dist.data.stream import Pair
    from pixelbert_dist.tasks.base import usable_folds

    log = logging.getLogger("pixelbert_dist.tasks.retrieval")
    seven = [Pair("test", i, f"image{i % 7}", b"", f"caption {i}", None, None) for i in range(35)]
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert usable_folds(5, seven, log) == 1
    assert "task.eval_folds=5 on 7 held-out images: folds of 1 image(s) would score 100" in caplog.text
    caplog.clear()
    assert usable_folds(3, seven, log) == 3 and usable_folds(1, seven, log) == 1  # folds of 2 and 7 images
    assert caplog.text == ""


def _newcomer_path() -> list[list[str]]:
    """The command block after <!-- newcomer-path --> in docs/training.md, as argument lists."""
    import shlex
    text = (REPO / "docs" / "training.md").read_text().split("<!-- newcomer-path -->\n", 1)[1]
    block = text.split("\n\n", 1)[0]
    return [shlex.split(line.strip().replace("$REPO", str(REPO))) for line in block.splitlines()]


@pytest.mark.slow
def test_the_newcomers_path_runs_as_the_docs_write_it_from_another_folder(tmp_path):
    """docs/training.md's block, command by command, in a folder outside the repository (the
    package as pip installed it, no PYTHONPATH): data, tokenizer, pre-training, export,
    fine-tuning from the export, export of the fine-tuned model; then both load."""
    import os

    from pixelbert_dist.model import PixelBert
    from pixelbert_dist.tokenizer import load_tokenizer

    commands = _newcomer_path()
    assert [c[2] for c in commands] == ["data_pipeline.synthetic", "data_pipeline.shard", "pixelbert_dist.tokenizer",
                                        "pixelbert_dist.pretrain", "pixelbert_dist.export", "pixelbert_dist.finetune",
                                        "pixelbert_dist.export"]
    elsewhere = tmp_path / "first-run"
    elsewhere.mkdir()
    env = {k: v for k, v in job_env(RAY_USAGE_STATS_ENABLED="0").items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    for command in commands:
        assert command[0] == "python"
        done = subprocess.run([sys.executable, *command[1:]], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    os.chdir(elsewhere)  # the docs' Python lines, with their relative paths
    try:
        pretrained = PixelBert.from_pretrained("exported/tiny")
        fine_tuned = export.load_exported("exported/retrieval")
    finally:
        os.chdir(REPO)
    vocab = load_tokenizer(str(elsewhere / "data" / "synthetic" / "vocab.txt")).get_vocab()
    assert pretrained.tokenizer.get_vocab() == vocab and fine_tuned.tokenizer.get_vocab() == vocab
    assert type(fine_tuned).__name__ == "PixelBertForRetrieval" and not fine_tuned.training
    trained_body = fine_tuned.body.state_dict()
    assert any(not torch.equal(trained_body[k], v) for k, v in pretrained.state_dict().items() if k in trained_body)
    from_checkpoint = PixelBert.from_pretrained(elsewhere / "runs" / "tiny" / "checkpoints" / "step00000008")
    assert all(torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(),
                                                  pretrained.state_dict().values()))
    assert from_checkpoint.tokenizer.get_vocab() == vocab  # data.tokenizer, found from the run's folder
    assert from_checkpoint.preprocessing == pretrained.preprocessing
