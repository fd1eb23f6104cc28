"""Image-caption sources, each read into `Record`s: one per image, with all its captions.

A source is named on the command line as `KIND:option=value,option=value`:

    coco:captions=annotations/captions_train2017.json,images=train2017
    vg:regions=region_descriptions.json,meta=image_data.json,images=VG,exclude_coco_ids=test_ids.txt
    manifest:path=pairs.parquet[,image_column=image][,caption_column=caption][,key_column=key][,images=ROOT]
    img2dataset:path=out_folder

Downstream tasks, in each dataset's own file format (captions are the task's texts, and
`targets` holds one label per text, aligned with it):

    vqa:questions=v2_OpenEnded_mscoco_train2014_questions.json,annotations=v2_mscoco_train2014_annotations.json,images=train2014[,prefix=COCO_train2014_]
    nlvr2:path=train.json,images=images/train
    karpathy:path=dataset_coco.json,images=COCO_ROOT,split=train+restval

Each kind's module (`READERS` below names them) says what layout it reads and how records
are formed. Every kind also takes `name=` (the tag written into each sample; default the
kind), `include=FILE` and `exclude=FILE` (image ids, one per line: the source's own ids,
e.g. COCO image ids for the Karpathy train+restval split).

Annotations are data, not instructions: every image a record names carries its `root` (the
source's `images=`, img2dataset's folder, a manifest's `images=` or folder), and the shard
job reads it only if it resolves, symlinks followed, inside that root, is a regular file and
is at most `--max-file-bytes`; otherwise it is skipped unread and counted as `unsafe_path`,
`not_a_file` or `too_large` (data_pipeline.storage.read_source). Only a manifest without
`images=` may name absolute paths and URIs anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

# importing a kind module registers its reader; this order is the order of the kinds in messages
from data_pipeline.sources import coco, visual_genome, manifest, img2dataset, vqa, nlvr2, karpathy  # noqa: F401
from data_pipeline.sources.types import READERS, Record, SourceError, SourceSpec

__all__ = ["READERS", "Record", "SourceError", "SourceSpec", "read_records"]


def read_records(spec: SourceSpec) -> Iterator[Record]:
    """Records of one source, filtered by its include/exclude lists, in the source's order."""
    for record in READERS[spec.kind](spec):
        if spec.keeps(record.source_id):
            yield record
