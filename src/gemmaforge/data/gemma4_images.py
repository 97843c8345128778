"""Gemma 4 image preprocessing, equal to transformers 5.23's ``Gemma4ImageProcessorPil``.

Each image (RGB) keeps its aspect ratio: it is resized (PIL bicubic) to the largest size whose sides
are multiples of ``pooling_kernel_size * patch_size`` (48 px) and that holds at most
``max_soft_tokens * pooling_kernel_size^2`` patches; pixels are rescaled to [0, 1] (no mean/std: the
tower maps them to [-1, 1] itself) and cut into ``patch_size`` squares, each flattened as
(row, column, channel). Every image is padded to the same number of patches; ``image_position_ids``
holds each patch's (x, y) in the grid and (-1, -1) for padding. One image gives
``(H / patch) * (W / patch) / k^2`` soft tokens.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


def target_size(height: int, width: int, patch_size: int, max_patches: int, k: int) -> tuple[int, int]:
    """The resized (height, width): the largest multiples of ``k * patch_size`` within ``max_patches``."""
    factor = math.sqrt(max_patches * patch_size ** 2 / (height * width))
    side = k * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise InputError(f"image of {width}x{height} px cannot be resized to a multiple of {side} px")
    longest = (max_patches // k ** 2) * side
    if th == 0:  # a very wide image: one row of cells, as wide as its aspect allows
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > max_patches * patch_size ** 2:
        raise InputError(f"image of {width}x{height} px: resizing to {tw}x{th} exceeds {max_patches} patches")
    return th, tw


def to_rgb(image):
    """RGB, transparency composited onto white (as transformers converts)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class Gemma4ImageProcessor:
    """PIL images -> ``pixel_values`` ``[n, max_patches, 3 * p^2]`` float32, ``image_position_ids``
    ``[n, max_patches, 2]`` int64 and ``num_soft_tokens_per_image``."""

    def __init__(self, patch_size: int = 16, max_soft_tokens: int = 280, pooling_kernel_size: int = 3,
                 rescale_factor: float = 1 / 255, **_ignored):
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise InputError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}; got {max_soft_tokens}")
        self.patch_size = patch_size
        self.max_soft_tokens = max_soft_tokens
        self.pooling_kernel_size = pooling_kernel_size
        self.rescale_factor = rescale_factor

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    def num_soft_tokens(self, height: int, width: int) -> int:
        th, tw = target_size(height, width, self.patch_size, self.max_patches, self.pooling_kernel_size)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size ** 2

    def preprocess_one(self, image) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        p, k = self.patch_size, self.pooling_kernel_size
        image = to_rgb(image)
        th, tw = target_size(image.height, image.width, p, self.max_patches, k)
        if (th, tw) != (image.height, image.width):
            image = image.resize((tw, th), resample=Image.Resampling.BICUBIC)
        x = np.asarray(image).transpose(2, 0, 1)  # (C, H, W) uint8
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        C, H, W = x.shape
        gh, gw = H // p, W // p
        patches = x.reshape(C, gh, p, gw, p).transpose(1, 3, 2, 4, 0).reshape(gh * gw, -1)  # (n, p*p*C)
        gx, gy = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
        pos = np.stack([gx, gy], axis=-1).reshape(gh * gw, 2)
        return patches, pos

    def __call__(self, images, return_tensors: str | None = None) -> dict:
        if not isinstance(images, (list, tuple)):
            images = [images]
        pix, pos, counts = [], [], []
        n = self.max_patches
        for im in images:
            x, xy = self.preprocess_one(im)
            counts.append(x.shape[0] // self.pooling_kernel_size ** 2)
            pix.append(np.pad(x, ((0, n - x.shape[0]), (0, 0))))
            pos.append(np.pad(xy, ((0, n - xy.shape[0]), (0, 0)), constant_values=-1))
        out = {"pixel_values": np.stack(pix), "image_position_ids": np.stack(pos).astype(np.int64),
               "num_soft_tokens_per_image": counts}
        if return_tensors == "pt":
            import torch

            out["pixel_values"] = torch.from_numpy(out["pixel_values"])
            out["image_position_ids"] = torch.from_numpy(out["image_position_ids"])
        return out
