"""How a batch crosses from a loader worker to the training process, and on to the device.

    worker:    map(to_wire, batches)        -> ((type, fields), BatchInfo)
    training:  map(from_wire, received)     -> (batch, BatchInfo), equal to the batch as made
    step:      to_device(batch, device)     -> the batch on the GPU, copied without waiting

DataLoader moves every tensor through shared memory, and the receiving process fetches each
one's handle from the worker over a socket: ~0.6 ms a tensor on two busy cores, most of the
data wait. So only the uint8 images go through shared memory; the small text tensors are
cheaper copied as numpy arrays, and the pixel mask is sent as image sizes.

On a GPU machine `from_wire` (run by the loader's receiving thread, off the step's path) also
pins the batch and checks the image sizes it is given anyway, so `to_device` queues each copy
behind the GPU's work and returns: the host never waits for the device to take a batch.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelbert_dist.data.types import TOKEN_STRIDE, BatchInfo, image_sizes


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
    """The inverse of `to_wire`, in the training process; pinned when a GPU will take it."""
    (kind, fields), info = item
    pin = torch.cuda.is_available()
    for name, value in fields.items():
        if name == "pixel_mask" and value is not None:
            sizes, (height, width) = value
            check_image_sizes(sizes)
            # types.pixel_mask_from_sizes in numpy: single-threaded, where a torch op this size
            # would start its intra-op threads beside the training step's and the loader workers
            rows = np.arange(height) < sizes[:, :1]
            cols = np.arange(width) < sizes[:, 1:]
            value = torch.from_numpy(rows[:, :, None] & cols[:, None, :])
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        fields[name] = value.pin_memory() if pin and isinstance(value, torch.Tensor) else value
    return kind(**fields), info


def to_device(batch, device: torch.device):
    """`batch` with every tensor on `device`. The copies are queued, not waited for: from pinned
    memory (from_wire's) the host goes on at once; the GPU's stream orders them before the step."""
    return type(batch)(**{name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                          for name, value in vars(batch).items()})


def check_image_sizes(sizes) -> None:
    """(B, 2) image heights and widths, on the host: every image covers a visual token cell
    (TOKEN_STRIDE px each way), or a ValueError names the first that does not."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    small = np.flatnonzero((sizes < TOKEN_STRIDE).any(axis=1))
    if small.size:
        i = int(small[0])
        raise ValueError(
            f"image {i} of the batch is {int(sizes[i, 0])}x{int(sizes[i, 1])} pixels, smaller than one "
            f"visual token cell ({TOKEN_STRIDE}x{TOKEN_STRIDE}); resize it up or drop it "
            f"({small.size} such images in this batch)")
