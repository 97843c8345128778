"""Images: reading files, and Gemma 3's image preprocessing as transformers 5.23's
``Gemma3ImageProcessor`` does it (``Gemma3ImageProcessorPil``, what it runs without torchvision;
the torchvision backend fuses rescale and normalise, a last-bit difference).

Each image is converted to RGB, resized to the checkpoint's square size (PIL's bilinear resize of the
uint8 pixels), rescaled by ``1/255`` and
normalised with the processor's mean and std (Gemma 3: 0.5 / 0.5, so pixels land in [-1, 1]).
Pan-and-scan (optional, off by default as in the released processor): an image whose aspect ratio
exceeds ``min_ratio`` is also cut into 2..``max_crops`` crops along its long side, each resized like
the thumbnail; the prompt then names the crops (``Gemma3ImageHandler.expansion``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError

RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


@contextlib.contextmanager
def _reading(p: Path):
    """PIL's errors while reading ``p`` as one ``InputError`` line naming the path."""
    from PIL import UnidentifiedImageError

    try:
        yield p
    except FileNotFoundError:
        raise InputError(f"{p}: image file not found") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InputError(f"{p}: not a readable image (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{p}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def open_image(source):
    """A PIL image (RGB) from a path or a PIL image; ``InputError`` naming the path if it cannot be read."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, torch.Tensor):
        return source
    with _reading(Path(source)) as p, Image.open(p) as im:
        im.load()
        return im.convert("RGB")


def check_image(path: str | os.PathLike) -> None:
    """Cheap check that ``path`` is an image PIL can read (header and structure, no decode)."""
    from PIL import Image

    with _reading(Path(path)) as p, Image.open(p) as im:
        im.verify()


def to_uint8_chw(image) -> torch.Tensor:
    """``[3, H, W]`` uint8 of a PIL image (or a uint8 / float tensor already ``[3, H, W]``)."""
    if isinstance(image, torch.Tensor):
        return image
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class Gemma3ImageConfig:
    """``preprocessor_config.json`` of a Gemma 3 checkpoint (the values that matter)."""

    size: tuple[int, int] = (896, 896)  # (height, width)
    resample: int = 2  # PIL bilinear
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_hf(cls, d: dict, image_size: int | None = None) -> "Gemma3ImageConfig":
        out = cls()
        size = d.get("size")
        if isinstance(size, dict) and "height" in size:
            out.size = (int(size["height"]), int(size["width"]))
        elif image_size:
            out.size = (image_size, image_size)
        for k in ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                  "do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                  "pan_and_scan_min_ratio_to_activate"):
            if d.get(k) is not None:
                setattr(out, k, d[k])
        if out.resample not in RESAMPLE:
            raise InputError(f"preprocessor_config.json: resample {out.resample} is not supported "
                             f"(choose from {sorted(RESAMPLE)})")
        return out

    def to_hf(self, image_seq_length: int) -> dict:
        return {
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": self.size[0], "width": self.size[1]}, "resample": self.resample,
            "do_resize": self.do_resize, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_convert_rgb": None, "do_pan_and_scan": self.do_pan_and_scan or None,
            "pan_and_scan_min_crop_size": self.pan_and_scan_min_crop_size,
            "pan_and_scan_max_num_crops": self.pan_and_scan_max_num_crops,
            "pan_and_scan_min_ratio_to_activate": self.pan_and_scan_min_ratio_to_activate,
            "image_seq_length": image_seq_length,
        }


class Gemma3ImageProcessor:
    """``images -> (pixel_values [n, 3, H, W] float32, crops per image)``."""

    def __init__(self, cfg: Gemma3ImageConfig | None = None):
        self.cfg = cfg or Gemma3ImageConfig()

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        """PIL's resize of uint8 pixels (transformers' PIL backend); float pixels with torch."""
        h, w = self.cfg.size
        if img.dtype == torch.uint8:
            from PIL import Image

            pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
            return to_uint8_chw(pil.resize((w, h), resample=self.cfg.resample))
        mode = {"nearest": "nearest-exact"}.get(RESAMPLE[self.cfg.resample], RESAMPLE[self.cfg.resample])
        return F.interpolate(img[None].float(), size=(h, w), mode=mode, antialias=mode != "nearest-exact")[0]

    def crops(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Pan-and-scan crops of one ``[3, H, W]`` image (none when its aspect ratio is near square)."""
        c = self.cfg
        h, w = img.shape[-2:]
        if w >= h:
            if w / h < c.pan_and_scan_min_ratio_to_activate:
                return []
            nw = min(int(math.floor(w / h + 0.5)), int(math.floor(w / c.pan_and_scan_min_crop_size)))
            nw, nh = min(c.pan_and_scan_max_num_crops, max(2, nw)), 1
        else:
            if h / w < c.pan_and_scan_min_ratio_to_activate:
                return []
            nh = min(int(math.floor(h / w + 0.5)), int(math.floor(h / c.pan_and_scan_min_crop_size)))
            nh, nw = min(c.pan_and_scan_max_num_crops, max(2, nh)), 1
        cw, ch = int(math.ceil(w / nw)), int(math.ceil(h / nh))
        if min(cw, ch) < c.pan_and_scan_min_crop_size:
            return []
        return [img[..., y:y + ch, x:x + cw] for y, x in itertools.product(
            [ch * i for i in range(nh)], [cw * i for i in range(nw)])]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """As transformers' PIL backend (what it runs without torchvision): ``x * rescale`` in float64
        cast to float32, then ``(x - mean) / std`` in float32."""
        c = self.cfg
        if c.do_rescale:
            x = (x.to(torch.float64) * c.rescale_factor).to(torch.float32)
        x = x.to(torch.float32)
        if c.do_normalize:
            mean = torch.tensor(c.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(c.image_std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images, do_pan_and_scan: bool | None = None) -> tuple[torch.Tensor, list[int]]:
        pas = self.cfg.do_pan_and_scan if do_pan_and_scan is None else do_pan_and_scan
        out, n_crops = [], []
        for image in images:
            img = to_uint8_chw(open_image(image))
            parts = [img] + (self.crops(img) if pas else [])
            n_crops.append(len(parts) - 1)
            for p in parts:
                out.append(self.normalize(self.resize(p) if self.cfg.do_resize else p))
        if not out:
            return torch.zeros(0, 3, *self.cfg.size), []
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) > 1:
            raise InputError(f"images of different sizes {sorted(shapes)} after preprocessing (do_resize is off)")
        return torch.stack(out), n_crops
