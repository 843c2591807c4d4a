"""The mim term (mmpretrain.objectives.mim): MAE's pixel target on the patches that patch dropout hid.

Against a naive float64 reference (per-sample, per-patch loops; its own sin-cos positions, patchify and
per-patch normalization): loss value and gradients, both tower families; the masking is the tower's patch
dropout (the encoder never reads a masked patch, the decoder gets the kept tokens at their positions, the
target covers exactly the masked ones); config checks; and, through DeepSpeed, 2 ranks under ZeRO-3 equal
one rank holding the whole batch, each rank's term being local and the logged value their mean.

This file is also the torchrun worker of the last test:
    torchrun --nproc_per_node=2 tests/unit/test_mim.py OUT.json engine.zero_stage=3
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD

DECODER = ["loss.terms.mim.decoder_width=32", "loss.terms.mim.decoder_heads=4", "loss.terms.mim.decoder_layers=2"]


def tiny_cfg(family="clip", extra=()):
    from mmpretrain.config import load_config

    name = "tiny" if family == "clip" else "siglip-tiny"
    terms = [f"loss.terms.{family}.weight=1.0", "loss.terms.mim.mask_ratio=0.5", *DECODER]
    return load_config(None, [f"model.name={name}", "data.synthetic.root=unused", *terms, *extra], world_size=1)


def tiny_model(cfg, dtype=torch.float64):
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    return model.to(dtype).train(), objective


def random_batch(cfg, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    size, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 1000, (batch, ctx), generator=g)
    return images, tokens


# ---- the naive reference (float64, loops) ----


def ref_position(p, grid, width):
    """Patch p (row-major) -> (width,): [sin(i w_k), cos(i w_k), sin(j w_k), cos(j w_k)], w_k = 1e4^(-k/(width/4))."""
    i, j = divmod(p, grid)
    q = width // 4
    vec = torch.zeros(width, dtype=torch.float64)
    for k in range(q):
        w = 10000.0 ** (-k / q)
        vec[k], vec[q + k] = math.sin(i * w), math.cos(i * w)
        vec[2 * q + k], vec[3 * q + k] = math.sin(j * w), math.cos(j * w)
    return vec


def ref_normalize(images_u8):
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (images_u8.double() / 255.0 - mean) / std


def ref_target(img_CHW, p, grid, ps, norm_pix):
    """One patch's target: its pixels in (row, column, channel) order, normalized by its own mean/std."""
    i, j = divmod(p, grid)
    pixels = []
    for r in range(ps):
        for c in range(ps):
            for ch in range(3):
                pixels.append(img_CHW[ch, i * ps + r, j * ps + c])
    x = torch.stack(pixels)
    if norm_pix:
        mean = x.sum() / len(x)
        var = ((x - mean) ** 2).sum() / (len(x) - 1)
        x = (x - mean) / torch.sqrt(var + 1e-6)
    return x


def ref_mim_loss(head, tokens_BND, keep_BK, images_BCHW, ps, norm_pix):
    """Mean over samples of the mean over masked patches of the per-patch pixel MSE, one sample at a time."""
    B, K = keep_BK.shape
    P = head.num_patches
    grid = math.isqrt(P)
    num_prefix = tokens_BND.shape[1] - K
    width = head.mask_token.shape[0]
    per_sample = []
    for b in range(B):
        x_ND = head.embed(head.norm_in(tokens_BND[b]))
        slot = {int(keep_BK[b, k]): num_prefix + k for k in range(K)}  # patch index -> its encoder token
        seq = [x_ND[t] for t in range(num_prefix)]
        seq += [(x_ND[slot[p]] if p in slot else head.mask_token) + ref_position(p, grid, width) for p in range(P)]
        h = torch.stack(seq)[None]
        for block in head.blocks:
            h = block(h)
        pred_PX = head.pred(head.norm(h[0, num_prefix:]))
        errs = [
            ((pred_PX[p] - ref_target(images_BCHW[b], p, grid, ps, norm_pix)) ** 2).mean()
            for p in range(P)
            if p not in slot
        ]
        per_sample.append(torch.stack(errs).mean())
    return torch.stack(per_sample).mean()


def term_loss(objective, model, out, images_u8, tokens):
    from mmpretrain.objectives import StepContext

    term = next(t for t in objective.terms if t.name == "mim")
    return term, term.loss(StepContext(out, None, tokens, {"image": images_u8}, model, None, None, 1))


# ---- tests ----


def test_sincos_positions_match_the_formula():
    from mmpretrain.objectives.mim import sincos_2d

    got = sincos_2d(16, 3)
    ref = torch.stack([ref_position(p, 3, 16) for p in range(9)])
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family,norm_pix", [("clip", True), ("clip", False), ("siglip", True)])
def test_loss_and_gradients_match_naive_reference(family, norm_pix):
    cfg = tiny_cfg(family, [f"loss.terms.mim.norm_pix={norm_pix}"])
    model, objective = tiny_model(cfg)
    images, tokens = random_batch(cfg)
    from mmpretrain.data.transforms import normalize_images

    out = model(normalize_images(images, torch.float64), tokens, **objective.forward_kwargs())
    P = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    K = P // 2
    num_prefix = 1 if family == "clip" else 0  # CLIP's class token; SigLIP has none
    assert out.image_keep.shape == (4, K)
    assert out.image_tokens.shape == (4, num_prefix + K, cfg.model.vision.width)
    term, loss = term_loss(objective, model, out, images, tokens)
    ref = ref_mim_loss(model.heads["mim"], out.image_tokens, out.image_keep, ref_normalize(images),
                       cfg.model.vision.patch_size, norm_pix)  # fmt: skip
    assert loss.dtype == torch.float64
    # Tolerances: float64 everywhere except the model's LayerNorms, which compute in float32 by design.
    torch.testing.assert_close(loss, ref, rtol=1e-7, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reached = 0
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            # relative to the tensor's norm: float32 LayerNorm rounding makes tiny entries noisy elementwise
            assert (g - w).norm() <= 1e-6 * w.norm() + 1e-12, (name, float((g - w).norm()), float(w.norm()))
            reached += name.startswith("vision_model.")
    assert reached > 0, "the term's gradient reaches the vision tower"


def test_decoder_input_holds_kept_tokens_at_their_positions():
    cfg = tiny_cfg()
    model, _ = tiny_model(cfg)
    head = model.heads["mim"]
    g = torch.Generator().manual_seed(3)
    keep_BK = torch.stack([torch.randperm(16, generator=g)[:8].sort().values for _ in range(3)])
    tokens_BND = torch.randn(3, 1 + 8, cfg.model.vision.width, dtype=torch.float64, generator=g)
    x = head.unshuffle(tokens_BND, keep_BK)  # (B, 1 + P, D)
    assert x.shape == (3, 1 + 16, 32)
    emb = head.embed(head.norm_in(tokens_BND))
    for b in range(3):
        torch.testing.assert_close(x[b, 0], emb[b, 0])  # the class token, no position
        for p in range(16):
            kept = (keep_BK[b] == p).nonzero()
            want = emb[b, 1 + int(kept[0, 0])] if len(kept) else head.mask_token
            torch.testing.assert_close(x[b, 1 + p], want + ref_position(p, 4, 32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_masking_is_patch_dropout_and_target_covers_the_masked_patches(family):
    from mmpretrain.data.transforms import normalize_images
    from mmpretrain.objectives import StepContext

    cfg = tiny_cfg(family)
    model, objective = tiny_model(cfg)
    images, tokens = random_batch(cfg, batch=3)
    ps, grid = cfg.model.vision.patch_size, cfg.model.vision.image_size // cfg.model.vision.patch_size

    def forward(imgs_u8):
        torch.manual_seed(7)  # the same mask each call
        return model(normalize_images(imgs_u8, torch.float64), tokens, **objective.forward_kwargs())

    out = forward(images)
    keep = out.image_keep
    masked = [[p for p in range(grid * grid) if p not in set(keep[b].tolist())] for b in range(3)]

    def repaint(patches):  # a copy of the images with the given (b, patch) pixels changed
        imgs = images.clone()
        for b, p in patches:
            i, j = divmod(p, grid)
            rows, cols = slice(i * ps, (i + 1) * ps), slice(j * ps, (j + 1) * ps)
            imgs[b, :, rows, cols] = 255 - imgs[b, :, rows, cols]
        return imgs

    # The encoder reads no masked patch: repainting them all changes neither tokens nor features.
    other = forward(repaint([(b, p) for b in range(3) for p in masked[b]]))
    assert torch.equal(other.image_keep, keep)
    torch.testing.assert_close(other.image_tokens, out.image_tokens, rtol=0, atol=0)
    torch.testing.assert_close(other.image_features, out.image_features, rtol=0, atol=0)
    # ... and it reads the kept ones.
    assert not torch.allclose(forward(repaint([(0, int(keep[0, 0]))])).image_tokens, out.image_tokens)

    # The target covers exactly the masked patches: the loss's gradient w.r.t. the target pixels.
    pixels = normalize_images(images, torch.float64).requires_grad_(True)  # float images: taken as normalized
    term = next(t for t in objective.terms if t.name == "mim")
    loss = term.loss(StepContext(out, None, tokens, {"image": pixels}, model, None, None, 1))
    (grad,) = torch.autograd.grad(loss, pixels)
    for b in range(3):
        for p in range(grid * grid):
            i, j = divmod(p, grid)
            touched = bool(grad[b, :, i * ps : (i + 1) * ps, j * ps : (j + 1) * ps].abs().sum() > 0)
            assert touched == (p in masked[b]), (b, p)


def test_forward_kwargs_and_head():
    from mmpretrain.objectives.mim import MimDecoder

    cfg = tiny_cfg(extra=["loss.terms.mim.mask_ratio=0.75"])
    model, objective = tiny_model(cfg)
    assert objective.forward_kwargs() == {"need": ("image_tokens",), "patch_drop": 0.75}
    assert isinstance(model.heads["mim"], MimDecoder)
    assert len(model.heads["mim"].blocks) == 2
    assert not any(k.endswith("pos_PD") for k in model.state_dict())  # fixed positions: rebuilt, not saved


@pytest.mark.parametrize(
    "extra,message",
    [
        (["model.vision.patch_dropout=0.3"], "loss.terms.mim.mask_ratio sets the patch masking; "
                                             "model.vision.patch_dropout must be 0"),
        (["loss.terms.mim.mask_ratio=0"], "loss.terms.mim.mask_ratio must be in (0, 1)"),
        (["loss.terms.mim.mask_ratio=1.0"], "loss.terms.mim.mask_ratio must be in (0, 1)"),
        (["loss.terms.mim.mask_ratio=1e-17"], "loss.terms.mim.mask_ratio=1e-17 masks no patch"),
        (["model.lock_image=true"], "model.lock_image must be false"),
        (["loss.terms.mim.decoder_width=30"], "loss.terms.mim.decoder_width must be a multiple of 4"),
        (["loss.terms.mim.decoder_layers=0"], "loss.terms.mim.decoder_layers must be >= 1"),
        (["loss.terms.mim.bogus=1"], "loss.terms.mim.bogus"),
    ],
)  # fmt: skip
def test_config_errors_name_the_keys(extra, message):
    from mmpretrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(extra=extra)
    assert message in str(e.value)


# ---- 2 ranks under ZeRO-3 == 1 rank holding the whole batch (DeepSpeed, gloo) ----

WORKER_STEPS = 3
GLOBAL_BATCH = 8


def worker(out_path, overrides):
    """Train steps on fixed global batches and fixed masks (the global batch's, each rank taking its rows)."""
    import mmpretrain.model.clip as clip_module
    from mmpretrain.distributed import destroy, init_distributed
    from mmpretrain.engine import build_engine
    from mmpretrain.step import TrainStep

    cfg = tiny_cfg("clip", ["train.batch_size=8", "optim.warmup_steps=1", *overrides])
    info = init_distributed()
    model, objective = tiny_model(cfg, torch.float32)
    per_rank = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=per_rank, total_steps=WORKER_STEPS)
    train_step = TrainStep(engine, objective, cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                           device=info.device)  # fmt: skip

    masks = {}

    def fixed_patch_dropout(x_BND, keep_frac, num_prefix):  # this rank's rows of the global batch's mask
        keep_BK = masks["keep"][mine]
        patches = x_BND[:, num_prefix:].gather(1, keep_BK[:, :, None].expand(-1, -1, x_BND.shape[-1]))
        return torch.cat([x_BND[:, :num_prefix], patches], dim=1), keep_BK

    clip_module.patch_dropout = fixed_patch_dropout
    term = next(t for t in objective.terms if t.name == "mim")
    local = []
    plain_loss = term.loss
    term.loss = lambda ctx: local.append(plain_loss(ctx)) or local[-1]  # records this rank's own value

    record = {"loss": [], "mim": [], "clip": [], "grad_norm": [], "local_mim": []}
    for step in range(WORKER_STEPS):
        g = torch.Generator().manual_seed(100 + step)
        images, tokens = random_batch(cfg, GLOBAL_BATCH, seed=100 + step)
        masks["keep"] = torch.stack([torch.randperm(16, generator=g)[:8].sort().values for _ in range(GLOBAL_BATCH)])
        res = train_step({"image": images[mine], "text": tokens[mine]}, step + 1)
        assert not res.skipped
        for key in ("mim", "clip"):
            record[key].append(res.terms[key])
        record["loss"].append(float(res.loss))
        record["grad_norm"].append(res.grad_norm)
        record["local_mim"].append(float(local[-1]))
    json.dump(record, open(f"{out_path}.rank{info.rank}", "w"))
    destroy()


def run_worker(tmp_path, nproc, overrides):
    from mmpretrain.distributed import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / f"n{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           __file__, str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(open(f"{out}.rank{r}").read()) for r in range(nproc)]


@pytest.mark.slow
def test_two_ranks_zero3_equal_one_rank_and_the_term_is_local(tmp_path):
    (ref,) = run_worker(tmp_path, 1, ["engine.zero_stage=0"])
    got = run_worker(tmp_path, 2, ["engine.zero_stage=3"])
    for step in range(WORKER_STEPS):
        for key in ("mim", "clip"):  # the logged terms: means over ranks, the same on both
            for rank in range(2):
                assert got[rank][key][step] == pytest.approx(ref[key][step], rel=1e-5), (key, step, rank)
        # train_step's own `loss` is this rank's total (clip is global, mim local): their mean is the 1-rank total
        mean_total = (got[0]["loss"][step] + got[1]["loss"][step]) / 2
        assert mean_total == pytest.approx(ref["loss"][step], rel=1e-5), step
        assert got[0]["grad_norm"][step] == pytest.approx(ref["grad_norm"][step], rel=1e-4), step
        # each rank's term is the mean over its own samples; the logged value is their mean
        a, b = got[0]["local_mim"][step], got[1]["local_mim"][step]
        assert a != pytest.approx(b, rel=1e-3)
        assert got[0]["mim"][step] == pytest.approx((a + b) / 2, rel=1e-6)
    assert len({round(x, 6) for x in ref["mim"]}) == WORKER_STEPS  # the steps moved the weights


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
