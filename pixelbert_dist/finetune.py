"""Fine-tune Pixel-BERT on a downstream task and evaluate it: VQA 2.0, NLVR2, retrieval.

    python -m pixelbert_dist.finetune --config configs/finetune/vqa-r50.yaml \\
        --task.init=runs/pretrain/checkpoints/step00040000 \\
        --data.train_manifest=s3://bucket/vqa-train --data.eval_manifest=s3://bucket/vqa-val
    torchrun --nproc_per_node 8 -m pixelbert_dist.finetune --config ...   # or deepspeed / --launcher ray
    ... --resume auto                                                     # continue this fine-tuning run

The same trainer, engine, launchers, checkpoints and MLflow tracking as pre-training: the
task's job spec (tasks/<name>.py) says what differs: the model (the pre-trained body under a
task head), the batches, the evaluation and the FLOPs of a sample. The model's
shape comes from `task.init` (a checkpoint folder or a `pixelbert_dist.export` folder), and so
does the tokenizer (the export's vocab.txt, or the pre-training run's data.tokenizer) unless
--data.tokenizer names another; the evaluation on data.eval_manifest runs every
train.eval_every steps and at the end. A fine-tuning checkpoint exports with its head:
`python -m pixelbert_dist.export CHECKPOINT OUT`, then `pixelbert_dist.export.load_exported(OUT)`.
"""

from pixelbert_dist import cli

if __name__ == "__main__":
    cli.entry_point("finetune", __doc__)
