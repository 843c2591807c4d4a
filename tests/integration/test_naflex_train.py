"""data.naflex end to end: the train loader packs whole images of their own aspect ratio (each packed image is
the NaFlex transform of its shard member, its caption next to it), and `python -m mmpretrain.train` trains a
tiny SigLIP on packed rows with a falling loss. Shards: the synthetic shapes stretched to aspect ratios 1:3..3:1."""

import io
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmpretrain.config import ConfigError, load_config
from mmpretrain.data import DataConfig, Tokenizer, build_train_loader
from mmpretrain.data.naflex import NaflexTransform
from mmpretrain.data.shards import ShardWriter
from mmpretrain.data.synthetic import caption, make_shape_sample
from mmpretrain.model.naflex import PackedImages
from tests.integration.test_train import ENV, TINY, read_metrics, train_cli

P, BUDGET, SEQ = 8, 16, 48  # siglip-tiny's patches; 16 patches an image at most; rows of at most 48
STEPS = 20


@pytest.fixture(scope="module")
def stretched_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("naflex") / "train"
    rng = np.random.default_rng(0)
    with ShardWriter(out, samples_per_shard=64) as writer:
        for i in range(256):
            s = make_shape_sample(rng, 32)
            ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
            img = s.image.resize((max(8, round(32 * math.sqrt(ratio))), max(8, round(32 / math.sqrt(ratio)))))
            writer.write({"__key__": f"{i:08d}", "png": img, "txt": caption(s, 0)})
    return str(out / "shard-{000000..000003}.tar")


def member(url_key):
    url, key = url_key.rsplit(":", 1)
    with tarfile.open(url) as tar:
        png = tar.extractfile(f"{key}.png").read()
        txt = tar.extractfile(f"{key}.txt").read().decode()
    return Image.open(io.BytesIO(png)).convert("RGB"), txt


@pytest.mark.parametrize("num_streams", [None, 0], ids=["streams", "per-rank"])
def test_loader_packs_whole_images_with_their_captions(stretched_shards, num_streams):
    cfg = DataConfig()
    cfg.train.urls = stretched_shards
    cfg.num_workers, cfg.num_streams = 0, num_streams  # the global order's StreamLoader, the per-rank TrainLoader
    cfg.naflex.enabled, cfg.naflex.max_patches, cfg.naflex.seq_len = True, BUDGET, SEQ
    tok = Tokenizer(32)
    loader = build_train_loader(cfg, tokenizer=tok, image_size=32, batch_size=16, rank=0, world_size=1, seed=0,
                                patch_size=P)  # fmt: skip
    batch = next(iter(loader))
    packed = batch["image"]
    assert isinstance(packed, PackedImages) and packed.num_images == 16 and len(batch["keys"]) == 16
    grids = [g for row in packed.shapes for g in row]
    assert len(set(grids)) > 3 and any(len(row) > 1 for row in packed.shapes)  # mixed grids, several per row
    R, N, _ = packed.patches_BNK.shape
    assert N <= SEQ and batch["naflex"]["tokens"] == R * N
    assert batch["naflex"]["padding"] == R * N - sum(h * w for h, w in grids)
    k = 0
    for b, row in enumerate(packed.shapes):  # every packed image is its own shard member's, its caption beside it
        start = 0
        for h, w in row:
            img, txt = member(batch["keys"][k])
            want, grid = NaflexTransform(P, BUDGET)(img)
            assert grid == (h, w)
            assert torch.equal(packed.patches_BNK[b, start : start + h * w], want)
            assert torch.equal(batch["text"][k], tok([txt])[0])
            start, k = start + h * w, k + 1


@pytest.fixture(scope="module")
def runs(stretched_shards, tmp_path_factory):
    """The tiny SigLIP on packed rows: an uninterrupted run, and one stopped after 10 steps then resumed."""
    root = tmp_path_factory.mktemp("naflex_runs")
    full, resumed = str(root / "full"), str(root / "resumed")

    def args(out):
        return [TINY, f"output_dir={out}", f"data.train.urls={stretched_shards}", "model.name=siglip-tiny",
                "loss.name=siglip", "data.naflex.enabled=true", f"data.naflex.max_patches={BUDGET}",
                f"data.naflex.seq_len={SEQ}", "train.batch_size=32", f"train.steps={STEPS}",
                "checkpoint.every_steps=0", "engine.cpu_threads=1"]  # fmt: skip

    train_cli(args(full), env=ENV)
    train_cli(["--stop-after-steps", "10", *args(resumed)], env=ENV)
    second = train_cli(args(resumed), env=ENV)
    return {"full": full, "resumed": resumed, "second": second}


@pytest.mark.slow
def test_train_cli_lowers_the_loss_on_packed_rows(runs):
    losses = [m["loss"] for m in read_metrics(runs["full"])]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_resume_continues_to_the_same_losses(runs):
    full, resumed = read_metrics(runs["full"]), read_metrics(runs["resumed"])
    assert "resumed from" in runs["second"].stdout
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), f"step {a['step']}"
        assert b["samples_seen"] == a["samples_seen"]


def test_naflex_config_is_checked_across_sections(tmp_path):
    with pytest.raises(ConfigError, match="data.naflex.enabled needs a SigLIP model"):
        load_config(TINY, [f"output_dir={tmp_path}", "data.synthetic.root=x", "data.naflex.enabled=true"])
    siglip = [f"output_dir={tmp_path}", "data.synthetic.root=x", "model.name=siglip-tiny", "data.naflex.enabled=true"]
    with pytest.raises(ConfigError, match="loss.name: data.naflex.enabled trains the sigmoid loss alone"):
        load_config(TINY, siglip)  # tiny.yaml's loss is clip
    with pytest.raises(ConfigError, match="data.naflex.enabled: train.accum_steps must be 1"):
        load_config(TINY, [*siglip, "loss.name=siglip", "train.accum_steps=2"])
    with pytest.raises(ConfigError, match="data.naflex.max_patches: must be <= data.naflex.seq_len"):
        load_config(TINY, [f"output_dir={tmp_path}", "data.synthetic.root=x", "model.name=siglip-tiny",
                           "loss.name=siglip", "data.naflex.enabled=true", "data.naflex.seq_len=8"])  # fmt: skip
