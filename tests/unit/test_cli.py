"""The command line: parsed once into an Invocation; `--help` shows the entry module's usage."""

from __future__ import annotations

import subprocess
import sys

import torch

from pixelbert_dist import cli, evaluate
from tests.launch import REPO, job_env


def test_arguments_are_parsed_once_into_an_invocation_with_the_overrides_in_order():
    call = cli.parse_args(["--config", "c.yaml", "--model.num_layers=2", "--resume", "auto", "--local_rank=1",
                           "--train.max_steps=3"], "pretrain")
    assert call.config == "c.yaml" and call.resume == "auto" and call.launcher == "env"
    assert call.overrides == ("--model.num_layers=2", "--train.max_steps=3")  # the deepspeed launcher's --local_rank is swallowed


def test_a_bad_override_is_exit_code_2_before_any_process_group():
    code = cli.run_job("pretrain", str(REPO / "configs/pretrain/tiny-cpu.yaml"), ("--model.num_layer=2",), None)
    assert code == 2


def test_help_of_each_entry_point_prints_its_own_usage():
    for job, phrase in (("pretrain", "Pre-train Pixel-BERT"), ("finetune", "Fine-tune Pixel-BERT")):
        done = subprocess.run([sys.executable, "-m", f"pixelbert_dist.{job}", "--help"], cwd=REPO, env=job_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and phrase in done.stdout and "--resume" in done.stdout


def test_inference_context_is_eval_mode_without_a_graph_and_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for mode in (True, False):
        model.train(mode)
        with evaluate.inference_context(model):
            assert not model.training and not model(torch.ones(1, 2)).requires_grad
        assert model.training is mode
