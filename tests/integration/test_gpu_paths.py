"""Issue 23 with real parts: DeepSpeed engines (bf16 statistics and accumulation, ZeRO-Offload with
our optimizer) on the CPU, the Ray decision on a real local cluster, and on a GPU: resume
exactness on CUDA and a training step that never waits for the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# One process, two engines of the same tiny model (frozen norms with non-trivial statistics):
# ZeRO-2 bf16, and the same with the optimizer offloaded to the host.
ENGINES = """
import json, sys
import torch
from torchvision.ops.misc import FrozenBatchNorm2d
from pixelbert_dist import distributed
from pixelbert_dist.config import load_config
from pixelbert_dist.consolidate import full_state_dict
from pixelbert_dist.engine import build_engine, deepspeed_config
from pixelbert_dist.flops import synthetic_batch
from pixelbert_dist.model import PixelBert
from pixelbert_dist.optim import build_lr_schedule, build_optimizer
from tests.conftest import TINY
from tests.launch import REPO

distributed.init()
def engine(offload):
    cfg = load_config(TINY, [f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--model.vocab_size=50",
                             "--model.num_layers=1", "--model.train_backbone_norm=false", "--train.precision=bf16",
                             "--optim.cnn_optimizer=sgd",  # both algorithms: the tiny config trains its CNN with AdamW
                             "--train.global_batch_size=4", "--train.micro_batch_size=2",
                             f"--deepspeed.offload_optimizer={offload}"])
    torch.manual_seed(0)
    model = PixelBert(cfg.model).train()
    for norm in model.modules():  # statistics bf16 would round (the initial 0 and 1 it would not)
        if isinstance(norm, FrozenBatchNorm2d):
            norm.running_mean.normal_(0.3, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.9, 1.1)
    stats = {n: b.clone() for n, b in model.named_buffers() if n.startswith("visual.cnn.")}
    optimizer = build_optimizer(model, cfg.optim)
    schedule = build_lr_schedule(optimizer, cfg.optim, 10)
    return build_engine(model, optimizer, schedule, deepspeed_config(cfg, 1)), stats

out = {}
for offload in (False, True):
    eng, before = engine(offload)
    after = dict(eng.module.named_buffers())
    losses = []
    for step in range(4):  # two optimizer steps of two micro-steps
        batch = synthetic_batch(50, 2, (128, 192), 12, seed=step)
        loss = eng(batch).loss
        eng.backward(loss)
        eng.step()
        losses.append(float(loss))
    opt = eng.optimizer
    state = {g["algorithm"]: sorted(k for p in g["params"] for k in opt.optimizer.state.get(p, {}))
             for g in opt.optimizer.param_groups}
    out[str(offload)] = {
        "stat_dtypes": sorted({str(after[n].dtype) for n in before}),
        "stats_exact": all(torch.equal(after[n].cpu(), b) for n, b in before.items()),
        "param_dtype": str(eng.module.bert.encoder.layer[0].output.dense.weight.dtype),
        "grad_accum_dtype": str(opt.gradient_accumulation_dtype),
        "optimizer": type(opt.optimizer).__name__, "offloaded": bool(opt.cpu_offload), "state": state,
        "losses": losses}
    torch.save(full_state_dict(eng, True), sys.argv[1] + f"/masters-{offload}.pt")
print("RESULTS " + json.dumps(out))
distributed.finish(0)
"""


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", ENGINES, str(folder)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    return json.loads(line.removeprefix("RESULTS ")), folder


def test_bf16_engine_keeps_frozen_norm_statistics_exact_in_fp32_and_accumulates_in_fp32(engines):
    plain = engines[0]["False"]
    assert plain["param_dtype"] == "torch.bfloat16"  # the model does train in bf16
    assert plain["stat_dtypes"] == ["torch.float32"] and plain["stats_exact"]  # not rounded to bf16 on the way
    assert plain["grad_accum_dtype"] == "torch.float32"


def test_offload_trains_with_our_two_algorithm_optimizer_like_the_engine_without_it(engines):
    results, folder = engines
    offload, plain = results["True"], results["False"]
    assert offload["offloaded"] and offload["optimizer"] == "PixelBertOptimizer"  # not DeepSpeedCPUAdam
    assert "momentum_buffer" in offload["state"]["sgd"] and "exp_avg" in offload["state"]["adamw"]
    assert offload["stats_exact"] and offload["grad_accum_dtype"] == "torch.float32"
    assert offload["losses"] == pytest.approx(plain["losses"], rel=1e-3)
    on_host, on_device = (torch.load(folder / f"masters-{o}.pt") for o in (True, False))
    assert on_host.keys() == on_device.keys()
    for name, tensor in on_device.items():  # the same update, wherever the fp32 masters live
        torch.testing.assert_close(on_host[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_ray_uses_the_clusters_gpus_not_the_drivers(ray_local):
    import ray

    from pixelbert_dist import ray_launcher
    resources = ray.cluster_resources()
    assert ray_launcher.use_gpu(resources, 2, None) is (resources.get("GPU", 0) > 0)
    assert ray_launcher.use_gpu(resources, 2, False) is False


# ---------------------------------------------------------------------------- on a GPU

# An uninterrupted run, a run resumed from its step-2 checkpoint, and the resume as it was before
# issue 23 (CPU and Python streams only): dropout and pixel sampling draw from the CUDA generator.
RESUME = """
import json, random, sys
from pathlib import Path
import torch
from pixelbert_dist import checkpoint, distributed
from pixelbert_dist.config import load_config
from pixelbert_dist.engine import build_engine, deepspeed_config
from pixelbert_dist.flops import synthetic_batch
from pixelbert_dist.model import PixelBert
from pixelbert_dist.optim import build_lr_schedule, build_optimizer
from tests.conftest import TINY
from tests.launch import REPO

root = Path(sys.argv[1])
info = distributed.init()
assert info.device.type == "cuda", info.device
cfg = load_config(TINY, [f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--model.vocab_size=50",
                         "--model.dropout=0.1", "--model.pixel_sample_count=3", "--train.precision=bf16",
                         "--train.global_batch_size=2", "--train.micro_batch_size=2"])
batches = [synthetic_batch(50, 2, (256, 320), 12, seed=s).to(info.device) for s in range(4)]

def fresh():
    torch.manual_seed(cfg.train.seed)  # what a new process does first (Trainer)
    random.seed(cfg.train.seed)
    model = PixelBert(cfg.model).train()
    optimizer = build_optimizer(model, cfg.optim)
    return build_engine(model, optimizer, build_lr_schedule(optimizer, cfg.optim, 10), deepspeed_config(cfg, 1))

def train(engine, steps):
    losses = []
    for step in steps:
        loss = engine(batches[step]).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses

engine = fresh()
full = train(engine, [0, 1])
checkpoint.save(engine, root, 2, {"rng": [checkpoint.rng_state()], "epoch": 0}, keep_last=1, is_main=True)
full += train(engine, [2, 3])
state = checkpoint.read_client_state(root, checkpoint.tag_for(2))["rng"][0]
out = {"full": full, "cuda_states": len(state.get("cuda", []))}
for name in ("resumed", "cpu_streams_only"):
    engine = fresh()
    checkpoint.load(engine, root, checkpoint.tag_for(2))
    if name == "resumed":
        checkpoint.restore_rng(state, reseed=1)
    else:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        random.setstate(checkpoint._tuple_state(state["python"]))
    out[name] = full[:2] + train(engine, [2, 3])
print("RESULTS " + json.dumps(out))
distributed.finish(0)
"""


@pytest.mark.gpu
@no_gpu
def test_resume_on_cuda_gives_the_uninterrupted_runs_losses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    out = json.loads(line.removeprefix("RESULTS "))
    print(json.dumps(out))
    assert out["cuda_states"] == torch.cuda.device_count()
    assert out["resumed"] == pytest.approx(out["full"], rel=1e-5)
    # the check can fail: without the CUDA stream, dropout and pixel sampling replay step 0's draws
    assert max(abs(a - b) / abs(b) for a, b in zip(out["cpu_streams_only"][2:], out["full"][2:])) > 1e-3


@pytest.mark.gpu
@no_gpu
def test_a_training_step_never_waits_for_the_gpu(tiny_cfg):
    from pixelbert_dist.data.wire import from_wire, to_device, to_wire
    from pixelbert_dist.flops import step_flops, synthetic_batch
    from pixelbert_dist.model import PixelBert, prepare_for_training
    from pixelbert_dist.optim import build_optimizer

    device = torch.device("cuda")
    model = PixelBert(tiny_cfg.model).train()
    prices = step_flops(model, (128, 192), 12, device)
    prepare_for_training(model, tiny_cfg.train, device)
    model.to(device)
    optimizer = build_optimizer(model, tiny_cfg.optim)  # fused SGD and AdamW
    sums = []

    def step(seed: int) -> None:
        batch, _ = from_wire(to_wire((synthetic_batch(tiny_cfg.model.vocab_size, 4, (128, 192), 12, seed=seed),
                                      "info")))
        assert all(t.is_pinned() for t in vars(batch).values() if isinstance(t, torch.Tensor))
        batch = to_device(batch, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums.append(out.loss.detach() + prices(batch))  # the metrics' sums stay on the device

    step(0)  # first use: constants copied once, kernels chosen
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing copy or host read raises
    try:
        for seed in (1, 2):
            step(seed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(s) for s in sums)


@pytest.mark.gpu
@no_gpu
def test_memory_peak_of_a_window_is_the_training_steps_on_the_gpu():
    from pixelbert_dist.metrics import StepTimer

    probe = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB: a FLOP probe, an evaluation
    del probe
    timer = StepTimer(device="cuda")  # a new window
    small = torch.ones(2**20, device="cuda") * 2
    timer.end_step(samples=1)
    assert timer.summary()["memory_peak_gib"] < 0.5
    del small
