import copy
import dataclasses

import pytest
import torch

from pixelbert_dist.model import PixelBert
from pixelbert_dist.flops import synthetic_batch
from pixelbert_dist.optim import (PixelBertOptimizer, build_lr_schedule, build_optimizer, lr_multiplier,
                                  param_groups)


@pytest.fixture
def paper_cfg(tiny_cfg):
    """The paper's optimizer (SGD for the CNN), on the tiny model."""
    tiny_cfg.optim = dataclasses.replace(tiny_cfg.optim, cnn_optimizer="sgd")
    return tiny_cfg


def _step_grads(model, seed=0):
    torch.manual_seed(seed)  # the same random pixel sampling for every copy
    batch = synthetic_batch(model.cfg.vocab_size, 2, (128, 192), 10, seed=seed)
    model(batch).loss.backward()


def test_groups_split_cnn_from_transformer_and_skip_decay_on_biases_and_norms(paper_cfg):
    tiny_cfg = paper_cfg
    model = PixelBert(tiny_cfg.model)
    groups = {g["name"]: g for g in param_groups(model, tiny_cfg.optim)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {g: {names[id(p)] for p in groups[g]["params"]} for g in groups}
    assert "visual.cnn.conv1.weight" in in_group["cnn"]
    assert "visual.proj.weight" in in_group["cnn"] and "visual.proj.bias" in in_group["cnn_no_decay"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in in_group["transformer"]
    assert "bert.encoder.layer.0.attention.self.query.bias" in in_group["transformer_no_decay"]
    assert "bert.embeddings.LayerNorm.weight" in in_group["transformer_no_decay"]
    assert "visual.semantic_embedding" in in_group["transformer_no_decay"]
    assert groups["cnn"]["algorithm"] == "sgd" and groups["transformer"]["algorithm"] == "adamw"
    assert groups["cnn_no_decay"]["weight_decay"] == 0 == groups["transformer_no_decay"]["weight_decay"]
    every = [p for g in groups.values() for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(every) == len({id(p) for p in every}) == len(trainable)  # each once, tied weight too


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-default"])
def test_one_step_equals_torch_sgd_and_adamw_on_copies(paper_cfg, fused):
    # Bit-exact against torch's own SGD and AdamW run with the same implementation: the
    # optimizer delegates, it does not reimplement. (Fused vs not: the next test, to tolerance.)
    tiny_cfg = paper_cfg
    model = PixelBert(tiny_cfg.model)
    _step_grads(model)
    ours_model, sgd_model, adamw_model = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    for copied in (ours_model, sgd_model, adamw_model):  # deepcopy leaves .grad behind
        for p, p0 in zip(copied.parameters(), model.parameters()):
            p.grad = None if p0.grad is None else p0.grad.clone()
    cfg = tiny_cfg.optim
    ours = build_optimizer(ours_model, cfg, fused=fused)
    implementation = {"fused": True} if fused else {}
    reference_sgd = torch.optim.SGD(
        [{k: v for k, v in g.items() if k not in ("name", "algorithm", "betas", "eps")}
         for g in param_groups(sgd_model, cfg) if g["algorithm"] == "sgd"], **implementation)
    reference_adamw = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k not in ("name", "algorithm", "momentum")}
         for g in param_groups(adamw_model, cfg) if g["algorithm"] == "adamw"], **implementation)
    for _ in range(3):  # several steps so momentum and Adam moments matter
        ours.step()
        reference_sgd.step()
        reference_adamw.step()
    moved_cnn = moved_transformer = 0
    for (name, p), (_, p_sgd), (_, p_adamw), (_, p0) in zip(
            ours_model.named_parameters(), sgd_model.named_parameters(),
            adamw_model.named_parameters(), model.named_parameters()):
        if p.grad is None:
            continue
        cnn = name.startswith(("visual.cnn.", "visual.proj."))
        expected = p_sgd if cnn else p_adamw
        assert torch.equal(p, expected), name
        if not torch.equal(p, p0):
            moved_cnn += cnn
            moved_transformer += not cnn
    assert moved_cnn > 5 and moved_transformer > 5


def test_fused_kernels_make_torchs_default_update_to_float_tolerance(paper_cfg):
    # Not bit-exact: a fused kernel evaluates the same formulas in one pass, in another order
    # (AdamW's bias corrections and decoupled decay folded together), so the last bits differ.
    model = PixelBert(paper_cfg.model)
    _step_grads(model)
    copies = {fused: copy.deepcopy(model) for fused in (True, False)}
    for copied in copies.values():
        for p, p0 in zip(copied.parameters(), model.parameters()):
            p.grad = None if p0.grad is None else p0.grad.clone()
    optimizers = {fused: build_optimizer(m, paper_cfg.optim, fused=fused) for fused, m in copies.items()}
    assert optimizers[True].param_groups[0]["fused"] and not optimizers[False].param_groups[0]["fused"]
    for _ in range(3):
        for opt in optimizers.values():
            opt.step()
    moved = 0
    for (name, a), b, p0 in zip(copies[True].named_parameters(), copies[False].parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        moved += not torch.equal(b, p0)
    assert moved > 10


def test_state_dict_round_trip_continues_exactly(paper_cfg):
    tiny_cfg = paper_cfg
    model = PixelBert(tiny_cfg.model)
    other = copy.deepcopy(model)
    opt = build_optimizer(model, tiny_cfg.optim)
    _step_grads(model)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in state["state"].values())
    assert any("exp_avg" in s for s in state["state"].values())

    other.load_state_dict(model.state_dict())
    resumed = build_optimizer(other, tiny_cfg.optim)
    resumed.load_state_dict(state)
    for m in (model, other):
        m.zero_grad()
        _step_grads(m, seed=1)
    opt.step()
    resumed.step()
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        PixelBertOptimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "algorithm": "lamb"}])


def test_schedule_warms_up_then_decays_at_the_papers_epochs(paper_cfg):
    tiny_cfg = paper_cfg
    cfg = tiny_cfg.optim
    cfg.warmup_steps, cfg.lr_decay_epochs = 10, [25, 35]
    steps_per_epoch = 100
    assert lr_multiplier(0, 10, steps_per_epoch, [25, 35], 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, steps_per_epoch, [25, 35], 0.1) == pytest.approx(1.0)
    assert lr_multiplier(2499, 10, steps_per_epoch, [25, 35], 0.1) == pytest.approx(1.0)
    assert lr_multiplier(2500, 10, steps_per_epoch, [25, 35], 0.1) == pytest.approx(0.1)
    assert lr_multiplier(3500, 10, steps_per_epoch, [25, 35], 0.1) == pytest.approx(0.01)
    model = PixelBert(tiny_cfg.model)
    opt = build_optimizer(model, cfg)
    schedule = build_lr_schedule(opt, cfg, steps_per_epoch)
    for _ in range(2600):
        opt.step()
        schedule.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["cnn"] == pytest.approx(cfg.cnn_lr * 0.1)
    assert lrs["transformer"] == pytest.approx(cfg.transformer_lr * 0.1)


def test_cnn_from_scratch_option_puts_the_cnn_under_adamw(tiny_cfg):
    assert tiny_cfg.optim.cnn_optimizer == "adamw"  # the shipped tiny config trains its CNN from scratch
    groups = {g["name"]: g for g in param_groups(PixelBert(tiny_cfg.model), tiny_cfg.optim)}
    assert groups["cnn"]["algorithm"] == "adamw" and groups["cnn"]["lr"] == tiny_cfg.optim.cnn_lr
    assert groups["cnn_no_decay"]["weight_decay"] == 0.0
