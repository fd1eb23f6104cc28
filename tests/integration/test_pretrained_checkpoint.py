"""PixelBert.from_pretrained on a DeepSpeed checkpoint folder saved by a DeepSpeed engine holding
the shipped tiny export: it scores as its export does, and finds the run's tokenizer from the
run's folder. (A real pre-training run's checkpoint: test_newcomer.py's path.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.synthetic import generate
from pixelbert_dist import export
from pixelbert_dist.model import PixelBert
from tests.launch import REPO, job_env

PRETRAINED = REPO / "tests" / "data" / "pretrained-tiny"

# One process: a ZeRO-2 engine over the export's weights, saved by the Checkpointer's own save.
SAVE_THROUGH_DEEPSPEED = """
import json, sys
from pathlib import Path
import torch
from pixelbert_dist import checkpoint, distributed
from pixelbert_dist.engine import build_engine
from pixelbert_dist.model import PixelBert

source, root = Path(sys.argv[1]), Path(sys.argv[2])
distributed.init()
model = PixelBert.from_pretrained(source).train()
ds_config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
             "zero_allow_untested_optimizer": True}
engine = build_engine(model, torch.optim.AdamW(model.parameters()), None, ds_config)
run_config = json.loads((source / "config.json").read_text())
checkpoint.save(engine, root, 7, {"config": run_config, "epoch": 0}, keep_last=1, is_main=True)
distributed.finish(0)
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint-images")
    generate(root, 3, seed=0)
    return sorted(str(p) for p in (root / "images").glob("*.jpg"))


CAPTIONS = ["a red square above a blue circle", "a yellow circle below two green circles",
            "two blue triangles below two blue squares"]


def _check_checkpoint_against_its_export(ckpt: Path, images: list[str], tmp_path: Path) -> None:
    from_checkpoint = PixelBert.from_pretrained(ckpt)
    assert not from_checkpoint.training
    assert from_checkpoint.tokenizer is not None  # data.tokenizer, relative to the run's folder
    assert export.main([str(ckpt), str(tmp_path / "exported")]) == 0
    exported = PixelBert.from_pretrained(tmp_path / "exported")  # the export carries the tokenizer now
    assert exported.tokenizer.get_vocab() == from_checkpoint.tokenizer.get_vocab()
    assert exported.preprocessing == from_checkpoint.preprocessing
    pairs = [image for image in images for _ in CAPTIONS], CAPTIONS * len(images)
    assert torch.equal(from_checkpoint.score(*pairs), exported.score(*pairs))
    assert torch.equal(export.load_exported(tmp_path / "exported").score(*pairs), exported.score(*pairs))


def test_a_checkpoint_of_the_export_scores_as_the_export(images, tmp_path):
    run = tmp_path / "run"  # the shipped run config: data.tokenizer=vocab/vocab.txt, checkpoint.dir=checkpoints
    (run / "vocab").mkdir(parents=True)
    shutil.copy(PRETRAINED / "vocab.txt", run / "vocab" / "vocab.txt")
    done = subprocess.run([sys.executable, "-c", SAVE_THROUGH_DEEPSPEED, str(PRETRAINED), str(run / "checkpoints")],
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = run / "checkpoints" / "step00000007"
    assert (ckpt / "complete.json").is_file()

    from_checkpoint = PixelBert.from_pretrained(ckpt)
    shipped = PixelBert.from_pretrained(PRETRAINED)
    assert all(torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(), shipped.state_dict().values()))
    assert torch.equal(from_checkpoint.score(images, CAPTIONS), shipped.score(images, CAPTIONS))
    _check_checkpoint_against_its_export(ckpt, images, tmp_path)
