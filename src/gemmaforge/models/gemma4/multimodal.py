"""The whole ``Gemma4ForConditionalGeneration``: the Gemma 4 text decoder with its vision and audio
towers and their embedders, as transformers 5.23 defines it.

``model(input_ids, pixel_values=..., image_position_ids=..., audio_features=..., audio_mask=...)``:
- images: ``pixel_values`` ``[n_images, max_patches, 3 * p * p]`` and ``image_position_ids``
  ``[n_images, max_patches, 2]`` (the image processor's, ``data.gemma4_media``); image ``i`` gives as
  many soft tokens as its valid patches / k^2, placed at the image placeholder tokens in order
  (row-major over a padded batch, along the row for packed documents). On configs with
  ``use_bidirectional_attention="vision"`` (26B, 31B) the tokens of one image see each other on
  sliding layers;
- audio: ``audio_features`` ``[n_clips, frames, mel]`` with ``audio_mask`` ``[n_clips, frames]`` (the
  feature extractor's ``input_features`` / ``input_features_mask``); each clip gives one soft token per
  4 valid frames, placed at the audio placeholder tokens in order.

Parameter names are transformers' in-memory ones with the decoder at ``model.`` (``model.layers``...):
``model.vision_tower``, ``model.embed_vision``, ``model.audio_tower``, ``model.embed_audio``.
Placeholders embed as the pad token (main and per-layer embeddings) before the features replace
them; the per-layer embeddings' context part then reads the merged embeddings, as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import InputError
from ..common.media import AUDIO, IMAGE, MediaSpec
from .audio import Gemma4AudioModel
from .config import Gemma4Config
from .model import Gemma4ForCausalLM
from .vision import Gemma4MultimodalEmbedder, Gemma4VisionModel

VISION_TOWERS = ("model.vision_tower", "model.embed_vision")
AUDIO_TOWERS = ("model.audio_tower", "model.embed_audio")


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    def __init__(self, cfg: Gemma4Config):
        super().__init__(cfg)
        if not cfg.is_multimodal:
            raise ValueError("Gemma4ForConditionalGeneration needs a config with a vision_config or an audio_config")
        h = cfg.hidden_size
        if cfg.vision_config is not None:
            v = cfg.vision_config
            self.model.vision_tower = Gemma4VisionModel(v)
            self.model.embed_vision = Gemma4MultimodalEmbedder(v.hidden_size, h, v.rms_norm_eps)
        if cfg.audio_config is not None:
            a = cfg.audio_config
            self.model.audio_tower = Gemma4AudioModel(a)
            self.model.embed_audio = Gemma4MultimodalEmbedder(a.output_proj_dims, h, a.rms_norm_eps)

    # ---- encoders ----
    def image_features(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[sum of soft tokens over images, hidden]``: what replaces the image tokens, in order."""
        if image_position_ids is None:
            raise InputError("pixel_values need image_position_ids (each patch's (x, y); the image processor's)")
        if pixel_values.dim() == 2:  # one image
            pixel_values, image_position_ids = pixel_values[None], image_position_ids[None]
        feats, _ = self.model.vision_tower(pixel_values, image_position_ids.to(pixel_values.device))
        return self.model.embed_vision(feats)

    def audio_features(self, audio_features: torch.Tensor, audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[sum of soft tokens over clips, hidden]``: what replaces the audio tokens, in order."""
        if audio_features.dim() == 2:  # one clip
            audio_features = audio_features[None]
            audio_mask = None if audio_mask is None else audio_mask[None]
        if audio_mask is None:
            audio_mask = torch.ones(audio_features.shape[:2], dtype=torch.bool, device=audio_features.device)
        feats, valid = self.model.audio_tower(audio_features, audio_mask.to(audio_features.device))
        return self.model.embed_audio(feats[valid])

    def media_specs(self) -> list:
        c, specs = self.config, []
        if c.vision_config is not None:
            specs.append(MediaSpec("image", ("pixel_values", "image_position_ids"), c.image_token_id, IMAGE, True,
                                   self.image_features, VISION_TOWERS))
        if c.audio_config is not None:
            specs.append(MediaSpec("audio", ("audio_features", "audio_mask"), c.audio_token_id, AUDIO, False,
                                   self.audio_features, AUDIO_TOWERS))
        return specs

    # ---- init ----
    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        """The reference's init: ones for norm weights and the position tables, zeros for biases and the
        audio attention's per-dimension scale, normal(0, std) for the rest."""
        if not name.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
                                "model.embed_audio.")):
            Gemma4ForCausalLM.init_parameter(name, p, std, generator)
        elif name.endswith("position_embedding_table") or (p.dim() == 1 and "norm" in name):
            nn.init.ones_(p)
        elif name.endswith(("bias", "per_dim_scale")):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)

    def init_buffers(self) -> None:
        super().init_buffers()
        for tower in ("vision_tower", "audio_tower"):
            m = getattr(self.model, tower, None)
            if m is not None:
                m.init_buffers()
