"""Issue 23: the CUDA-only paths, checked where a CPU can see them (and on a GPU where it cannot).

Random streams saved and restored, the DeepSpeed config of offload and bf16, the Ray GPU
decision, the forward without host syncs (same outputs as before), image sizes checked on the
host, the FLOPs of what a step trained, and each logging window's own memory peak.
"""

from __future__ import annotations

import json
import logging
import mmap
import random
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask

from pixelbert_dist import checkpoint, ray_launcher
from pixelbert_dist.config import ConfigError, TrackingConfig, load_config
from pixelbert_dist.data.wire import from_wire, to_device, to_wire
from pixelbert_dist.distributed import DistInfo
from pixelbert_dist.engine import deepspeed_config
from pixelbert_dist.flops import measure_flops, step_flops
from pixelbert_dist.metrics import StepTimer, peak_memory_gib, reset_peak_memory
from pixelbert_dist.model import IGNORE_INDEX, PixelBert, PretrainBatch, pad_images, sample_visual_tokens
from pixelbert_dist.tracking import Tracker
from pixelbert_dist.training_metrics import TrainingMetrics
from tests.conftest import TINY
from tests.launch import REPO

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------- 1. random streams


def _draws(device: str = "cpu") -> list:
    """One draw from each generator a training step uses: Python's, torch's, dropout's."""
    return [random.random(), torch.rand(3).tolist(), F.dropout(torch.ones(8), 0.5).tolist(),
            torch.rand(3, device=device).tolist()]


def test_rng_state_round_trips_every_generator_a_step_draws_from():
    state = json.loads(json.dumps(checkpoint.rng_state()))  # as client_state.json holds it
    assert ("cuda" in state) == torch.cuda.is_available()
    first = _draws()
    checkpoint.restore_rng(state, reseed=7)
    assert _draws() == first


@pytest.mark.gpu
@no_gpu
def test_each_cuda_generator_is_saved_restored_or_reseeded():
    state = json.loads(json.dumps(checkpoint.rng_state()))
    assert len(state["cuda"]) == torch.cuda.device_count()  # one entry per visible device
    first = _draws("cuda")
    checkpoint.restore_rng(state, reseed=7)
    assert _draws("cuda") == first  # dropout and pixel sampling on the GPU continue, not replay
    del state["cuda"]  # a checkpoint written on a CPU: the CUDA streams start from the reseed
    checkpoint.restore_rng(state, reseed=7)
    after = torch.rand(3, device="cuda").tolist()
    torch.cuda.manual_seed_all(7)
    assert after == torch.rand(3, device="cuda").tolist()


# ---------------------------------------------------------------------------- 2 and 5. DeepSpeed config


def _ds(*overrides: str, world: int = 1) -> dict:
    cfg = load_config(TINY, [f"--deepspeed.config={REPO / 'configs/deepspeed/zero2.json'}", "--model.vocab_size=50",
                             *overrides])
    return deepspeed_config(cfg, world)


def test_offload_lets_deepspeed_take_our_optimizer_and_needs_zero():
    ds = _ds("--deepspeed.offload_optimizer=true")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # else ZeRORuntimeException in deepspeed.initialize
    assert "zero_force_ds_cpu_optimizer" not in _ds()
    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO"):
        _ds("--deepspeed.offload_optimizer=true", "--deepspeed.zero_stage=0")


def test_bf16_keeps_frozen_norm_statistics_and_gradient_sums_in_fp32():
    frozen = _ds("--train.precision=bf16", "--model.train_backbone_norm=false")["data_types"]
    assert frozen == {"buffer_dtype": "bf16", "keep_in_fp32_modules": ["visual.cnn."], "grad_accum_dtype": "fp32"}
    # trained norms' statistics follow the activations' dtype (bf16 batch norm wants them so)
    trained = _ds("--train.precision=bf16", "--model.train_backbone_norm=true")["data_types"]
    assert "keep_in_fp32_modules" not in trained and trained["grad_accum_dtype"] == "fp32"
    assert "data_types" not in _ds("--train.precision=fp32")
    # without ZeRO DeepSpeed can only sum in bf16: refused when there is something to sum
    with pytest.raises(ConfigError, match="zero_stage=0 would sum 2 micro-steps' gradients in bf16"):
        _ds("--train.precision=bf16", "--deepspeed.zero_stage=0", "--train.global_batch_size=8",
            "--train.micro_batch_size=4")
    assert "grad_accum_dtype" not in _ds("--train.precision=bf16", "--deepspeed.zero_stage=0",
                                         "--train.global_batch_size=4", "--train.micro_batch_size=4")["data_types"]


def test_a_json_that_sums_bf16_gradients_in_bf16_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    cfg = load_config(TINY, [f"--deepspeed.config={path}", "--model.vocab_size=50", "--train.precision=bf16"])
    with pytest.raises(ConfigError, match="grad_accum_dtype='bf16'"):
        deepspeed_config(cfg, 1)


# ---------------------------------------------------------------------------- 3. Ray: GPU or CPU workers


def test_ray_gpu_decision_follows_the_cluster_or_the_explicit_option():
    cpu_head_gpu_workers = {"CPU": 80.0, "GPU": 8.0}  # what ray.cluster_resources() says, not the head's torch
    assert ray_launcher.use_gpu(cpu_head_gpu_workers, 8, None) is True
    assert ray_launcher.use_gpu({"CPU": 2.0}, 2, None) is False
    assert ray_launcher.use_gpu({"CPU": 2.0}, 2, True) is True  # explicit: wait for GPU nodes (autoscaling)
    assert ray_launcher.use_gpu(cpu_head_gpu_workers, 8, False) is False
    with pytest.raises(RuntimeError, match="has 4 GPUs for 8 workers"):
        ray_launcher.use_gpu({"CPU": 80.0, "GPU": 4.0}, 8, None)
    assert [ray_launcher.wanted_from_env(v) for v in (None, "auto", "1", "true", "0", "no")] == \
        [None, None, True, True, False, False]
    with pytest.raises(ValueError, match="PIXELBERT_RAY_GPU='maybe'"):
        ray_launcher.wanted_from_env("maybe")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a worker without a GPU")
def test_a_worker_asked_for_a_gpu_that_sees_none_stops_naming_its_host():
    import socket
    ray_launcher.check_worker_device(False)  # a CPU run on a CPU worker is fine
    with pytest.raises(RuntimeError, match=f"worker on {socket.gethostname()} was started to train on a GPU"):
        ray_launcher.check_worker_device(True)


# ---------------------------------------------------------------------------- 4. no host syncs in a step


SIZES = [(64, 128), (128, 192), (128, 64)]  # multiples of 64: a pair alone runs on exactly its pixels


def _padded_batch(vocab_size: int) -> PretrainBatch:
    gen = torch.Generator().manual_seed(3)
    sizes, lengths = SIZES, [6, 12, 9]
    images, mask = pad_images([torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes])
    ids = torch.randint(5, vocab_size, (3, 12), generator=gen)
    attention = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(attention.bool() & (torch.rand(3, 12, generator=gen) < 0.3), ids, IGNORE_INDEX)
    return PretrainBatch(images, mask, ids, attention, labels, torch.tensor([1, 1, 1]))


def _previous_forward(model: PixelBert, batch: PretrainBatch):
    """The forward as it was before issue 23: an unpadded shortcut, the mask skip, boolean indexing."""
    visual, visual_mask = model.visual(batch.images, batch.pixel_mask)
    if model.training and model.cfg.pixel_sample_count > 0:
        visual, visual_mask = sample_visual_tokens(visual, visual_mask, model.cfg.pixel_sample_count)
    hidden = model.bert.embeddings(input_ids=batch.input_ids)
    hidden = torch.cat([hidden, visual.to(hidden.dtype)], dim=1)
    mask = torch.cat([batch.attention_mask.bool(), visual_mask], dim=1)
    attention = create_bidirectional_mask(config=model.bert.config, inputs_embeds=hidden, attention_mask=mask)
    hidden = model.bert.encoder(hidden, attention_mask=attention).last_hidden_state
    itm_logits = model.cls.seq_relationship(model.bert.pooler(hidden))
    selected = batch.mlm_labels != IGNORE_INDEX
    logits = model.cls.predictions(hidden[:, : batch.input_ids.shape[1]][selected]).float()
    targets = batch.mlm_labels[selected]
    mlm_loss = F.cross_entropy(logits, targets)
    return {"mlm_loss": mlm_loss, "mlm_accuracy": 100 * (logits.argmax(-1) == targets).float().mean(),
            "itm_loss": F.cross_entropy(itm_logits.float(), batch.itm_labels), "itm_logits": itm_logits}


def test_the_sync_free_forward_gives_the_previous_outputs_and_gradients_on_a_padded_batch(tiny_cfg):
    model = PixelBert(tiny_cfg.model).train()
    batch = _padded_batch(tiny_cfg.model.vocab_size)
    torch.manual_seed(0)  # the same pixel sampling draws in both
    old = _previous_forward(model, batch)
    (old["mlm_loss"] + old["itm_loss"]).backward()
    old_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)
    new = model(batch)
    new.loss.backward()
    for key in ("mlm_loss", "mlm_accuracy", "itm_loss", "itm_logits"):
        torch.testing.assert_close(getattr(new, key), old[key], rtol=1e-6, atol=1e-7, msg=key)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(old_grads)
    for name, grad in old_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7, msg=name)
    # unpadded, the trunk now masks with ones instead of skipping: the same features, bit for bit
    images = batch.images[:1, :, :128, :192]
    normalized = model.visual.normalize(images, torch.ones(1, 128, 192, dtype=torch.bool))
    assert torch.equal(model.visual.cnn(normalized, torch.ones(1, 128, 192, dtype=torch.bool)),
                       model.visual.cnn(normalized, None))


def test_image_sizes_are_checked_on_the_host_before_the_copy(tiny_cfg):
    gen = torch.Generator().manual_seed(0)
    images, mask = pad_images([torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                               for h, w in [(256, 256), (40, 300)]])
    ids = torch.randint(5, 50, (2, 6), generator=gen)
    item = to_wire((PretrainBatch(images, mask, ids, torch.ones_like(ids)), "info"))
    with pytest.raises(ValueError, match=r"image 1 of the batch is 40x300 pixels, smaller than one visual token"):
        from_wire(item)
    good = PretrainBatch(images[:1], mask[:1], ids[:1], torch.ones_like(ids[:1]))
    received, _ = from_wire(to_wire((good, "info")))
    moved = to_device(received, torch.device("cpu"))
    assert torch.equal(moved.images, good.images) and torch.equal(moved.pixel_mask, good.pixel_mask)


# ---------------------------------------------------------------------------- 6. FLOPs and memory


def test_step_flops_count_what_a_batch_of_mixed_sizes_trained(tiny_cfg):
    import dataclasses
    model = PixelBert(dataclasses.replace(tiny_cfg.model, pixel_sample_count=0)).train()
    batch = _padded_batch(tiny_cfg.model.vocab_size)
    batch.mlm_labels = torch.where(batch.attention_mask.bool(), batch.input_ids, IGNORE_INDEX)  # every real token
    prices = step_flops(model, (128, 192), 12, torch.device("cpu"))
    counted = float(prices(batch))
    # each pair alone, unpadded: its own image size and text length, counted by FlopCounterMode
    alone = 0.0
    for i, (h, w) in enumerate(SIZES):
        n = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i:i + 1, :n]
        alone += measure_flops(model, PretrainBatch(batch.images[i:i + 1, :, :h, :w], batch.pixel_mask[i:i + 1, :h, :w],
                                                    ids, torch.ones_like(ids), ids.clone(),
                                                    batch.itm_labels[i:i + 1])).training
    assert counted == pytest.approx(alone, rel=0.01)
    # the count at the configured canvas for every pair (before issue 23) overstates this batch by half
    configured = measure_flops(model, PretrainBatch(batch.images[1:2], batch.pixel_mask[1:2], batch.input_ids[1:2],
                                                    torch.ones_like(batch.input_ids[1:2]),
                                                    batch.input_ids[1:2].clone(), batch.itm_labels[1:2])).training
    assert 3 * configured > 1.5 * counted


def test_each_logging_window_reports_its_own_memory_peak():
    info = DistInfo(0, 1, 0, torch.device("cpu"), "single")
    reset_peak_memory("cpu")  # so the probe sets the peak, whatever earlier tests in this process held
    probe = mmap.mmap(-1, 200 * 2**20)  # a FLOP probe's or an evaluation's memory, touched, then unmapped
    probe.write(b"\1" * len(probe))  # (mapped by hand: an allocator may keep a freed array resident)
    probe.close()
    before = peak_memory_gib("cpu")
    metrics = TrainingMetrics(("loss",), StepTimer(device="cpu"), Tracker(TrackingConfig(), enabled=False), info,
                              every=1, logger=logging.getLogger("test"))
    metrics.record(SimpleNamespace(loss=torch.tensor(1.0)), samples=2, images=2, flops=torch.tensor(6e9))
    logged = metrics.log(1, counters={}, extra={})
    assert logged["memory_peak_gib"] < before - 0.12  # the window's, not the probe's
    assert logged["tflops_per_device"] == pytest.approx(6e9 / 1e12 / logged["step_time_s"], rel=0.05)


# ---------------------------------------------------------------------------- 7. the GPU check script


def test_gpu_check_script_parses_and_bench_step_orders_rows_after_their_baselines():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks/gpu_check.sh")]).returncode == 0
    import sys
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_step
    rows = bench_step.lever_rows(8, [], [32])
    picked = bench_step.pick_rows(rows, ["zero2-today", "all-mb32", "all"])
    assert [r.name for r in picked] == ["today", "zero2-today", "today-mb32", "all-mb32", "all"]
    assert [r.micro_batch for r in picked] == [0, 0, 32, 32, 0]  # 0: the settings' micro batch
