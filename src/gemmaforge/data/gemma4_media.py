"""Gemma 4's media handlers for the processor (``data.processor.Processor``), as transformers 5.23's
``Gemma4Processor`` expands its prompts.

- image: the chat renderer's image marker becomes ``<|image>`` + ``<|image|>`` x n + ``<image|>``, n the
  image's soft tokens (its resized patch grid / k^2: it depends on the image's size and aspect ratio);
  inputs ``pixel_values`` ``[n_images, max_patches, 3 * p^2]`` and ``image_position_ids``;
- audio: the audio marker becomes ``<|audio>`` + ``<|audio|>`` x n + ``<audio|>``, n one soft token per
  40 ms of real audio (the frame mask subsampled twice); inputs ``audio_features`` ``[n_clips, frames,
  128]`` and ``audio_mask``; audio files are WAV (``data.audio.read_wav``, resampled to 16 kHz).

Token types: image 1, audio 3 (the reference's ``mm_token_type_ids``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .audio import Gemma4AudioFeatureExtractor, read_wav
from .gemma4_images import Gemma4ImageProcessor

IMAGE_TYPE, AUDIO_TYPE = 1, 3
IMAGE_MARKER = "<start_of_image>"  # what the chat renderer writes for an image part
AUDIO_MARKER = "<start_of_audio>"  # ... and for an audio part


class Gemma4ImageHandler:
    modality = "image"
    part_type = "image"
    token_type = IMAGE_TYPE
    marker = IMAGE_MARKER
    fixed_expansion = None  # the number of soft tokens depends on the image's size

    def __init__(self, image_processor: Gemma4ImageProcessor, *, boi_id: int, eoi_id: int, image_id: int,
                 boi: str = "<|image>", eoi: str = "<image|>", image_token: str = "<|image|>"):
        self.image_processor = image_processor
        self.token_id = image_id
        self.boi, self.eoi, self.image_token = boi, eoi, image_token
        self.special = {boi: boi_id, eoi: eoi_id, image_token: image_id}

    def expansion(self, n_soft: int) -> str:
        return f"{self.boi}{self.image_token * n_soft}{self.eoi}"

    def check(self, path) -> None:
        from .images import check_image

        check_image(path)

    def save(self, directory) -> None:
        ip = self.image_processor
        _update_processor_config(directory, {
            "image_seq_length": ip.max_soft_tokens,
            "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "patch_size": ip.patch_size,
                                "max_soft_tokens": ip.max_soft_tokens, "pooling_kernel_size": ip.pooling_kernel_size,
                                "do_resize": True, "resample": 3, "do_rescale": True,
                                "rescale_factor": ip.rescale_factor, "do_normalize": False,
                                "do_convert_rgb": True}})

    def expansion_of(self, path) -> str:
        """The expansion of one image file from its header alone (its size), without decoding it."""
        from PIL import Image

        self.check(path)
        with Image.open(path) as im:
            w, h = im.size
        return self.expansion(self.image_processor.num_soft_tokens(h, w))

    def __call__(self, items, **_):
        from .images import open_image

        out = self.image_processor([open_image(x) for x in items], return_tensors="pt")
        return ({"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]},
                [self.expansion(n) for n in out["num_soft_tokens_per_image"]])


class Gemma4AudioHandler:
    modality = "audio"
    part_type = "audio"
    token_type = AUDIO_TYPE
    marker = AUDIO_MARKER
    fixed_expansion = None  # the number of soft tokens depends on the clip's length

    def __init__(self, feature_extractor: Gemma4AudioFeatureExtractor, *, boa_id: int, eoa_id: int, audio_id: int,
                 boa: str = "<|audio>", eoa: str = "<audio|>", audio_token: str = "<|audio|>",
                 max_soft_tokens: int = 750):
        self.feature_extractor = feature_extractor
        self.token_id = audio_id
        self.boa, self.eoa, self.audio_token = boa, eoa, audio_token
        self.special = {boa: boa_id, eoa: eoa_id, audio_token: audio_id}
        self.max_soft_tokens = max_soft_tokens

    def expansion(self, n_soft: int) -> str:
        return f"{self.boa}{self.audio_token * n_soft}{self.eoa}"

    def load(self, source) -> np.ndarray:
        if isinstance(source, (str, Path)):
            return read_wav(source, self.feature_extractor.sampling_rate)
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        x = np.asarray(source, dtype=np.float32)
        if x.ndim != 1:
            raise InputError(f"audio: expected a 1-D waveform at {self.feature_extractor.sampling_rate} Hz, "
                             f"got shape {x.shape}")
        return x

    def check(self, path) -> None:
        read_wav(path)

    def save(self, directory) -> None:
        fe = self.feature_extractor
        _update_processor_config(directory, {
            "audio_seq_length": self.max_soft_tokens, "audio_ms_per_token": 40,
            "feature_extractor": {"feature_extractor_type": "Gemma4AudioFeatureExtractor",
                                  "feature_size": fe.feature_size, "sampling_rate": fe.sampling_rate,
                                  "padding_value": fe.padding_value, "return_attention_mask": True,
                                  "frame_length_ms": fe.frame_length * 1000.0 / fe.sampling_rate,
                                  "hop_length_ms": fe.hop_length * 1000.0 / fe.sampling_rate,
                                  "min_frequency": fe.min_frequency, "max_frequency": fe.max_frequency,
                                  "preemphasis": fe.preemphasis, "preemphasis_htk_flavor": fe.preemphasis_htk_flavor,
                                  "fft_overdrive": fe.fft_overdrive, "dither": 0.0,
                                  "input_scale_factor": fe.input_scale_factor, "mel_floor": float(fe.mel_floor),
                                  "per_bin_mean": None if fe.per_bin_mean is None else fe.per_bin_mean.ravel().tolist(),
                                  "per_bin_stddev": None if fe.per_bin_stddev is None
                                  else fe.per_bin_stddev.ravel().tolist()}})

    def expansion_of(self, path) -> str:
        """The expansion of one WAV file (its soft tokens follow from its length alone)."""
        fe = self.feature_extractor
        n = min(len(read_wav(path, fe.sampling_rate)), fe.max_length)
        frames = (n + fe.frame_length // 2 - (fe.frame_length + 1)) // fe.hop_length + 1
        # the valid frames come first; the two stride-2 convolutions keep ceil(ceil(f / 2) / 2) = ceil(f / 4)
        return self.expansion(-(-frames // 4) if frames > 0 else 0)

    def __call__(self, items, **_):
        out = self.feature_extractor([self.load(x) for x in items], return_tensors="pt")
        counts = [self.feature_extractor.num_soft_tokens(m) for m in out["input_features_mask"].numpy()]
        too_long = [n for n in counts if n > self.max_soft_tokens]
        if too_long:
            raise InputError(f"audio clip of {too_long[0]} soft tokens exceeds the processor's "
                             f"{self.max_soft_tokens} (30 s)")
        return ({"audio_features": out["input_features"], "audio_mask": out["input_features_mask"]},
                [self.expansion(n) for n in counts])


def _update_processor_config(directory, values: dict) -> None:
    """Merge ``values`` into ``processor_config.json`` (transformers' Gemma4Processor layout: the image
    processor and the feature extractor nested; each handler writes its part)."""
    f = Path(directory) / "processor_config.json"
    d = json.loads(f.read_text()) if f.is_file() else {}
    d.update({"processor_class": "Gemma4Processor", **values})
    f.write_text(json.dumps(d, indent=2) + "\n")


def gemma4_handlers(cfg, preprocessor: dict | None, tokenizer=None) -> list:
    """The handlers of a multimodal Gemma 4 config; ``preprocessor``: the checkpoint's
    ``processor_config.json`` / ``preprocessor_config.json`` values (transformers nests them under
    ``image_processor`` / ``feature_extractor``; flat keys are read too)."""
    pre = dict(preprocessor or {})
    img_kw = {**pre, **(pre.get("image_processor") or {})}
    aud_kw = {**pre, **(pre.get("feature_extractor") or {})}
    out = []
    if cfg.vision_config is not None:
        v = cfg.vision_config
        ip = Gemma4ImageProcessor(patch_size=int(img_kw.get("patch_size", v.patch_size)),
                                  max_soft_tokens=int(img_kw.get("max_soft_tokens", img_kw.get("image_seq_length", 280))),
                                  pooling_kernel_size=int(img_kw.get("pooling_kernel_size", v.pooling_kernel_size)),
                                  rescale_factor=float(img_kw.get("rescale_factor", 1 / 255)))
        out.append(Gemma4ImageHandler(ip, boi_id=cfg.boi_token_id, eoi_id=cfg.eoi_token_id, image_id=cfg.image_token_id))
    if cfg.audio_config is not None:
        names = ("feature_size", "sampling_rate", "padding_value", "frame_length_ms", "hop_length_ms", "min_frequency",
                 "max_frequency", "preemphasis", "preemphasis_htk_flavor", "fft_overdrive", "input_scale_factor",
                 "mel_floor", "per_bin_mean", "per_bin_stddev")
        kw = {k: aud_kw[k] for k in names if aud_kw.get(k) is not None}
        kw.setdefault("feature_size", cfg.audio_config.subsampling_conv_channels[0])  # the tower's mel bins
        fe = Gemma4AudioFeatureExtractor(**kw)
        out.append(Gemma4AudioHandler(fe, boa_id=cfg.boa_token_id, eoa_id=cfg.eoa_token_id,
                                      audio_id=cfg.audio_token_id,
                                      max_soft_tokens=int(pre.get("audio_seq_length", 750))))
    return out
