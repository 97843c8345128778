"""Helpers of the Gemma 3 vision tests: a tiny multimodal model dir with a word-level tokenizer whose
ids fit the tiny vocabulary, synthetic images and image+text chat JSONL."""

import json

import numpy as np
import torch

import gemmaforge

WORDS = "the cat sat on a mat and dog ran to big red house in morning sun what is this color blue green".split()
SPECIAL = {"<start_of_turn>": 105, "<end_of_turn>": 106, "<start_of_image>": 509, "<end_of_image>": 510,
           "<image_soft_token>": 511}
IMG, BOI, EOI = 511, 509, 510


def tiny_tokenizer():
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from gemmaforge.data.tokenizer import Tokenizer

    names = ["<pad>", "<eos>", "<bos>", "<unk>", *[f"▁{w}" for w in WORDS]]
    vocab = {f"<unused{i}>": i for i in range(512)}
    for i, n in enumerate(names):
        vocab[n] = i
    for n, i in SPECIAL.items():
        vocab[n] = i
    vocab = {n: i for n, i in vocab.items() if not (n.startswith("<unused") and (int(n[7:-1]) < len(names)
                                                                              or int(n[7:-1]) in SPECIAL.values()))}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in SPECIAL])
    return Tokenizer(backend)


def tiny_model(seed=0):
    m = gemmaforge.from_config("gemma-3-tiny-vision", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norm weights (zero-init norms would hide a wrong norm formula)
        for n, p in m.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "vision_tower" in n else 0.0))
            elif p.dim() == 1 and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def save_tiny_dir(model, d):
    from gemmaforge.formats.hf import save_hf
    from gemmaforge.formats.processor import build_processor

    save_hf(model, d, tokenizer=build_processor(model.config, tiny_tokenizer()))
    return d


def write_image(path, seed, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_chat_jsonl(d, n=6, images_per_doc=(1, 2)):
    """``n`` image+text conversations in ``d/data.jsonl`` (images in ``d/img``, paths relative)."""
    (d / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        parts = []
        for j in range(images_per_doc[k % len(images_per_doc)]):
            write_image(d / "img" / f"{k}_{j}.png", 100 * k + j)
            parts.append({"type": "image", "path": f"img/{k}_{j}.png"})
        parts.append({"type": "text", "text": "what is this"})
        reply = " ".join(WORDS[(k + i) % 8] for i in range(5))
        lines.append(json.dumps({"messages": [{"role": "user", "content": parts},
                                              {"role": "assistant", "content": reply}]}))
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"
