"""How a batch crosses from a loader worker to the training process: the last stage of a worker.

    worker:    map(to_wire, batches)        -> ((type, fields), BatchInfo)
    training:  map(from_wire, received)     -> (batch, BatchInfo), equal to the batch as made

DataLoader moves every tensor through shared memory, and the receiving process fetches each
one's handle from the worker over a socket: ~0.6 ms a tensor on two busy cores, most of the
data wait. So only the uint8 images go through shared memory; the small text tensors are
cheaper copied as numpy arrays, and the pixel mask is sent as image sizes.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelbert_dist.data.types import BatchInfo, image_sizes


def to_wire(item: tuple[object, BatchInfo]) -> tuple[tuple[type, dict], BatchInfo]:
    """(batch, info) -> ((batch type, fields), info): the images shared, the rest by value."""
    batch, info = item
    fields = {}
    for name, value in vars(batch).items():
        if name == "pixel_mask" and value is not None:
            value = (image_sizes(value).numpy(), tuple(value.shape[-2:]))
        elif name != "images" and isinstance(value, torch.Tensor):
            value = value.numpy()
        fields[name] = value
    return (type(batch), fields), info


def from_wire(item: tuple[tuple[type, dict], BatchInfo]) -> tuple[object, BatchInfo]:
    """The inverse of `to_wire`, in the training process."""
    (kind, fields), info = item
    for name, value in fields.items():
        if name == "pixel_mask" and value is not None:
            sizes, (height, width) = value
            # types.pixel_mask_from_sizes in numpy: single-threaded, where a torch op this size
            # would start its intra-op threads beside the training step's and the loader workers
            rows = np.arange(height) < sizes[:, :1]
            cols = np.arange(width) < sizes[:, 1:]
            value = torch.from_numpy(rows[:, :, None] & cols[:, None, :])
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        fields[name] = value
    return kind(**fields), info
