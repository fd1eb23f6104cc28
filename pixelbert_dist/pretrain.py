"""Pre-train Pixel-BERT.

    # one process; the tiny config's vocab is trained on the captions first (or set --data.tokenizer)
    python -m pixelbert_dist.tokenizer --captions data/synthetic/annotations/captions.json --out data/synthetic
    python -m pixelbert_dist.pretrain --config configs/pretrain/tiny-cpu.yaml --data.train_manifest=data/shards
    # 2 processes on this machine
    torchrun --nproc_per_node 2 -m pixelbert_dist.pretrain --config ... [--section.key=value ...]
    deepspeed --hostfile cluster/hosts --no_ssh --node_rank 0 --master_addr 127.0.0.1 --module pixelbert_dist.pretrain --config ...
    # resume from the newest complete checkpoint under checkpoint.dir (or start fresh)
    ... --resume auto

Recipe (cli.py): parse config -> join the process group -> build the trainer for the
pre-training job (jobs.py; data and config checked before any step) -> train -> leave cleanly.
"""

from pixelbert_dist import cli

if __name__ == "__main__":
    cli.entry_point("pretrain", __doc__)
