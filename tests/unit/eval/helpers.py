"""What the evaluation tests share: tiny clip_benchmark sets written on the fly, stand-in tokenizers and models.

Legend: N images, C classes, T texts, E embedding width.
"""

import io
import os
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmpretrain.config import load_config
from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, normalize_images
from mmpretrain.model import build_model
from mmpretrain.objectives import Objective

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
COLORS.update({"purple": (140, 30, 160), "cyan": (30, 210, 220), "white": (250, 250, 250)})
CLASSNAMES = list(COLORS)
TEMPLATES = ["a photo of {c}.", "{c}", "something {c} here"]


def png(rgb, seed: int) -> bytes:
    """A 12x12 image of color `rgb` with seeded noise (so a random model scores no two images alike)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.integers(-25, 26, size=(12, 12, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    """samples: list of (key, {ext: bytes})."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_sets(root, num_images: int = 11, broken: int = 3):
    """A zero-shot and a retrieval set in clip_benchmark layout; returns (zeroshot_root, retrieval_root, meta).

    Image i has class i % C; sample `broken` holds corrupt image bytes (skipped by the loader, which makes
    rank 1 of 2 hold fewer batches); shards split unevenly (3 + rest). Captions: 1 to 3 per image, naming its color.
    """
    zs, rt = os.path.join(root, "colors"), os.path.join(root, "colors_captions")
    zs_samples, rt_samples, labels, captions = [], [], [], []
    for i in range(num_images):
        c = i % len(CLASSNAMES)
        image = b"not an image" if i == broken else png(COLORS[CLASSNAMES[c]], i)
        labels.append(c)
        caps = [f"{CLASSNAMES[c]} number {i} version {j}" for j in range(1 + i % 3)]
        captions.append(caps)
        zs_samples.append((f"s{i:04d}", {"png": image, "cls": str(c).encode()}))
        rt_samples.append((f"s{i:04d}", {"png": image, "txt": "\n".join(caps).encode()}))
    for folder, samples in ((zs, zs_samples), (rt, rt_samples)):
        write_tar(os.path.join(folder, "test", "0.tar"), samples[:3])
        write_tar(os.path.join(folder, "test", "1.tar"), samples[3:])
    with open(os.path.join(zs, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    with open(os.path.join(zs, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    return zs, rt, {"labels": labels, "captions": captions, "broken": broken}


SIZE = 8  # eval image side: the 12x12 test images are resized and center-cropped to it
transform = EvalTransform(SIZE)


class CharTokenizer:
    """Deterministic stand-in for the BPE tokenizer: characters mod 97, padded with 0, length 24."""

    def __call__(self, texts):
        out = torch.zeros(len(texts), 24, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + ord(ch) % 96 for ch in t[:24]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class CountingTokenizer(CharTokenizer):
    def __init__(self):
        self.texts = []

    def __call__(self, texts):
        self.texts += texts
        return super().__call__(texts)


class RandomTwoTower(nn.Module):
    """Seeded random towers with the model's interface; records every forward call's batch size."""

    def __init__(self, seed: int = 0, embed: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(3 * 8 * 8, embed, generator=g))
        self.token_emb = nn.Parameter(torch.randn(97, embed, generator=g))
        self.calls = []

    def encode_image(self, images_BCHW):
        self.calls.append(("image", len(images_BCHW), torch.is_grad_enabled(), self.training))
        images_BCHW = normalize_images(images_BCHW)  # uint8 straight from the transform; floats pass through
        return F.normalize(images_BCHW.flatten(1).to(self.image_proj.dtype) @ self.image_proj, dim=-1).float()

    def encode_text(self, tokens_BL):
        self.calls.append(("text", len(tokens_BL), torch.is_grad_enabled(), self.training))
        weights_BL = torch.arange(1, tokens_BL.shape[1] + 1, dtype=self.token_emb.dtype)  # order-sensitive pooling
        return F.normalize((self.token_emb[tokens_BL] * weights_BL[None, :, None]).sum(1), dim=-1).float()


class ColorOracle(RandomTwoTower):
    """Knows the answer: images embed as the one-hot of their nearest palette color, texts as the one-hot of
    the color they name, shifted by `shift` classes (shift=0: always right; shift=1: always wrong)."""

    def __init__(self, shift: int = 0):
        super().__init__(embed=len(CLASSNAMES))
        self.shift = shift
        self.tokenizer = CharTokenizer()
        self.name_tokens = [self.tokenizer([n])[0, : len(n)] for n in CLASSNAMES]

    def encode_image(self, images_BCHW):
        super().encode_image(images_BCHW)
        images_BCHW = normalize_images(images_BCHW)  # uint8 straight from the transform; floats pass through
        pixels_BCHW = (
            images_BCHW.float() * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
        )
        mean_B3 = pixels_BCHW.mean((2, 3)) * 255
        palette_C3 = torch.tensor(list(COLORS.values()), dtype=torch.float32)
        return F.one_hot(torch.cdist(mean_B3, palette_C3).argmin(1), len(CLASSNAMES)).float()

    def encode_text(self, tokens_BL):
        super().encode_text(tokens_BL)
        out = torch.zeros(len(tokens_BL), len(CLASSNAMES))
        for b, row in enumerate(tokens_BL):
            for c, name in enumerate(self.name_tokens):
                if row.unfold(0, len(name), 1).eq(name).all(1).any():
                    out[b, (c + self.shift) % len(CLASSNAMES)] = 1.0
        return out


def topk_reference(logits, labels, ks):
    order = logits.argsort(1, descending=True)
    return {k: (order[:, :k] == labels[:, None]).any(1).double().mean().item() for k in ks}


def recall_reference(img, txt, txt_to_img, ks):
    sim = img @ txt.T
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(img)):
            top = sim[i].argsort(descending=True)[:k].tolist()
            hits += any(txt_to_img[t] == i for t in top)
        out[f"image_to_text_R@{k}"] = hits / len(img)
    for k in ks:
        hits = 0
        for t in range(len(txt)):
            top = sim[:, t].argsort(descending=True)[:k].tolist()
            hits += txt_to_img[t].item() in top
        out[f"text_to_image_R@{k}"] = hits / len(txt)
    return out


def tiny_itm_model(seed: int = 0):
    cfg = load_config(None, ["data.synthetic.root=/tmp/unused", "model.name=tiny", "loss.terms.clip.weight=1",
                             "loss.terms.itm.layers=1"])  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    Objective(cfg).attach_heads(model)
    return model.eval(), cfg
