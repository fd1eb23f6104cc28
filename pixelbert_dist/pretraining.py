"""The pre-training job: Pixel-BERT with MLM + ITM on image-caption shards, checked by zero-shot
retrieval (the ITM head ranking held-out images against their captions)."""

from __future__ import annotations

import dataclasses

from pixelbert_dist import evaluate
from pixelbert_dist.config import ConfigError, PretrainConfig
from pixelbert_dist.data.batch import BatchBuilder
from pixelbert_dist.flops import training_flops_per_sample
from pixelbert_dist.model import PixelBert
from pixelbert_dist.spec import JobSpec, ResolvedRun

OUTPUT_KEYS = ("loss", "mlm_loss", "itm_loss", "mlm_accuracy", "itm_accuracy")  # PixelBertOutput's logged fields


def resolve(cfg: PretrainConfig, tokenizer) -> ResolvedRun:
    model = cfg.model
    if model.vocab_size == 0:  # 0: the tokenizer's size
        model = dataclasses.replace(model, vocab_size=len(tokenizer))
    if len(tokenizer) != model.vocab_size:
        raise ConfigError(f"model.vocab_size is {model.vocab_size} but the tokenizer {cfg.data.tokenizer} has "
                          f"{len(tokenizer)} entries: set --model.vocab_size=0 (the tokenizer's size), or "
                          f"--data.tokenizer to the vocab of {model.vocab_size} entries")
    return ResolvedRun(dataclasses.replace(cfg, model=model), tokenizer)


def itm_scorer(model: PixelBert):
    """Match score of the ITM head: log-odds of "matches", i.e. logit(yes) - logit(no)."""
    def score(input_ids, attention_mask, visual, visual_mask):
        logits = model.cls.seq_relationship(model.bert.pooler(model.fuse(input_ids, attention_mask,
                                                                            visual, visual_mask)))
        return logits[:, 1] - logits[:, 0]
    return score


def zero_shot_retrieval(model: PixelBert, pairs, run: ResolvedRun, device) -> dict[str, float]:
    with evaluate.inference_context(model):
        return evaluate.retrieval(model.visual, itm_scorer(model), pairs, run.tokenizer, run.cfg.data, device,
                                  batch_size=64)


def flops_per_sample(model: PixelBert, run: ResolvedRun, device) -> float:
    data = run.cfg.data  # at the configured image size (landscape, unpadded)
    return training_flops_per_sample(model, (data.image_short_side, data.image_long_side), data.max_text_len,
                                     device)


PRETRAINING = JobSpec(
    name="pretrain",
    resolve=resolve,
    build_model=lambda run, pretrained: PixelBert(run.cfg.model),  # weights: model.*_weights, or the checkpoint's
    batch_builder=lambda run: BatchBuilder,
    flops_per_sample=flops_per_sample,
    evaluate=zero_shot_retrieval,
    eval_prefix="zeroshot",
    output_keys=OUTPUT_KEYS,
    eval_images=lambda cfg: cfg.train.eval_images,
)
