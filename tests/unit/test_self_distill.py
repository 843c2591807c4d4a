"""The self_distill term (mmpretrain.objectives.self_distill): SigLIP 2's SILC and TIPS against an EMA teacher.

Against a naive float64 reference (per-vector projection heads with their own GELU and normalization, per-row
softmax cross-entropy, masking by per-patch pixel loops): the loss value and the student's gradients, each part
alone and summed; the teacher (copied at the first active step, then EMA with the cosine momentum; centers from
the teacher's batch mean); start_fraction; the mask drawn for the global batch; the local crops of the loader;
the config's errors. 2 ranks under ZeRO-3 and exact resume: tests/distributed/test_self_distill_distributed.py.
"""

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmpretrain.data import DataConfig, Tokenizer, TrainDataConfig, build_train_loader
from mmpretrain.data.shards import ShardWriter
from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, TrainTransform
from mmpretrain.objectives.self_distill import ema_momentum, patch_mask

HEAD = ["loss.terms.self_distill.prototypes=16", "loss.terms.self_distill.head_width=8"]


def tiny_cfg(extra=()):
    from mmpretrain.config import load_config

    over = ["model.name=siglip-tiny", "data.synthetic.root=unused", "loss.terms.siglip.weight=1.0",
            "data.train.local_crops=2", "train.steps=10", *HEAD, *extra]  # fmt: skip
    return load_config(None, over, world_size=1)


def tiny_setup(cfg, dtype=torch.float64):
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    objective.setup(torch.device("cpu"))
    term = next(t for t in objective.terms if t.name == "self_distill")
    term.teacher.to(dtype)
    return model.to(dtype).train(), objective, term


def random_batch(cfg, batch=3, crops=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.vision.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
    local = torch.randint(0, 256, (batch, crops, 3, s, s), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 1000, (batch, cfg.model.text.context_length), generator=g)
    return {"image": images, "local_crops": local, "text": tokens}


def make_ctx(model, batch, step, dtype=torch.float64):
    from mmpretrain.objectives import StepContext

    images = ref_normalize(batch["image"]).to(dtype)
    return StepContext(None, images, batch["text"], batch, model, None, None, step)


def perturb_teacher(term, seed=5):
    """A teacher unlike the student (as after EMA steps) and non-zero centers; marked started."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in term.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        term.teacher.center_global.copy_(torch.randn(term.cfg.prototypes, generator=g))
        term.teacher.center_patch.copy_(torch.randn(term.cfg.prototypes, generator=g))
        term.teacher.started.fill_(1)


# ---- the naive reference (float64, loops) ----


def ref_normalize(images_u8):
    """CLIP normalization in float32, as the train step applies it to the loader's uint8 images, then float64."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((images_u8.float() - mean) / std).double()


def ref_head(head, x_D):
    """fc1 -> exact GELU -> fc2 -> unit length -> prototypes, for one vector."""
    h = head.fc1.weight @ x_D + head.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = head.fc2.weight @ h + head.fc2.bias
    h = h / h.pow(2).sum().sqrt()
    return head.prototypes.weight @ h


def ref_ce(s_K, t_K, c_K, ts, tt):
    """-sum_k p_k log q_k with p = softmax((t - c) / tt), q = softmax(s / ts), written out."""
    e = torch.exp((t_K - c_K) / tt - ((t_K - c_K) / tt).max())
    p = e / e.sum()
    z = s_K / ts
    log_q = z - (z.max() + torch.log(torch.exp(z - z.max()).sum()))
    return -(p * log_q).sum()


def ref_mask(images_BCHW, mask_BP, patch_Cpp):
    out = images_BCHW.clone()
    ps = patch_Cpp.shape[-1]
    grid = images_BCHW.shape[-1] // ps
    for b in range(images_BCHW.shape[0]):
        for p in range(grid * grid):
            if mask_BP[b, p]:
                i, j = divmod(p, grid)
                out[b, :, i * ps : (i + 1) * ps, j * ps : (j + 1) * ps] = patch_Cpp
    return out


def ref_loss(model, term, batch, mask_BP, silc=True, tips=True):
    """silc_weight x mean over (sample, crop) + tips_weight x mean over masked (sample, patch), float64."""
    c, t = term.cfg, term.teacher
    heads = model.heads["self_distill"]
    images = ref_normalize(batch["image"])
    with torch.no_grad():
        t_out = t.vision(images, patch_drop=0.0)
    total = torch.zeros((), dtype=torch.float64)
    if silc:
        losses = []
        for i in range(images.shape[0]):
            t_glob = ref_head(t.global_proj, t_out.embeds[i])
            for j in range(batch["local_crops"].shape[1]):
                s_emb = model.vision_model(ref_normalize(batch["local_crops"][i, j][None]), patch_drop=0.0).embeds[0]
                losses.append(ref_ce(ref_head(heads.global_proj, s_emb), t_glob, t.center_global, c.student_temp,
                                     c.teacher_temp))  # fmt: skip
        total = total + c.silc_weight * torch.stack(losses).mean()
    if tips:
        masked = ref_mask(images, mask_BP, heads.mask_patch)
        s_tokens = model.vision_model(masked, patch_drop=0.0).last_hidden_state
        losses = []
        for i in range(images.shape[0]):
            for p in range(mask_BP.shape[1]):
                if mask_BP[i, p]:
                    t_K = ref_head(t.patch_proj, t_out.last_hidden_state[i, p])
                    s_K = ref_head(heads.patch_proj, s_tokens[i, p])
                    losses.append(ref_ce(s_K, t_K, t.center_patch, c.student_temp, c.teacher_temp))
        total = total + c.tips_weight * torch.stack(losses).mean()
    return total


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- tests ----


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.25)], ids=["silc", "tips", "both"])
def test_loss_and_gradients_match_naive_reference(weights):
    silc_w, tips_w = weights
    cfg = tiny_cfg([f"loss.terms.self_distill.silc_weight={silc_w}", f"loss.terms.self_distill.tips_weight={tips_w}"])
    model, _, term = tiny_setup(cfg)
    perturb_teacher(term)
    batch = random_batch(cfg)
    step = term.first + 1
    got = term.loss(make_ctx(model, batch, step))
    got.backward()
    g_got = grads(model)
    model.zero_grad(set_to_none=True)
    mask = patch_mask(cfg.train.seed, step, 3, term.num_patches, term.num_masked, 0, 3)
    want = ref_loss(model, term, batch, mask, silc=bool(silc_w), tips=bool(tips_w))
    want.backward()
    g_want = grads(model)
    # the towers' LayerNorms compute in float32 (mmpretrain.model.layers.LayerNorm): batched and one-by-one forwards
    # agree to ~1e-7, the rest of the term is float64
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert g_got.keys() == g_want.keys()
    assert any(k.startswith("vision_model.") for k in g_got) and any(k.startswith("heads.") for k in g_got)
    assert ("heads.self_distill.mask_patch" in g_got) == bool(tips_w)
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-5, atol=1e-8, msg=k)
    assert all(p.grad is None for p in term.teacher.parameters())  # the teacher is never trained


def test_off_before_start_then_teacher_copies_student_and_follows_by_ema():
    term_cfg = {"start_fraction": 0.5, "momentum": 0.9, "momentum_end": 1.0, "center_momentum": 0.8}
    cfg = tiny_cfg([f"loss.terms.self_distill.{k}={v}" for k, v in term_cfg.items()])
    model, _, term = tiny_setup(cfg)
    assert term.first == 6  # on for steps 6..10 of 10: the last half
    batch = random_batch(cfg)
    before = {k: v.clone() for k, v in term.teacher.state_dict().items()}
    off = term.loss(make_ctx(model, batch, 5))
    assert str(float(off)) == "0.0"  # not -0.0 in the logs
    off.backward()  # the heads get a gradient of exact zeros (the same for AdamW on 1 and N ranks), nothing else
    got = grads(model)
    assert sorted(got) == sorted(f"heads.self_distill.{n}" for n, _ in model.heads["self_distill"].named_parameters())
    assert all(not g.any() for g in got.values())
    model.zero_grad(set_to_none=True)
    term.after_step(model, 5)
    assert all(torch.equal(before[k], v) for k, v in term.teacher.state_dict().items())
    assert int(term.teacher.started) == 0

    # the first step on: the teacher starts as the student (tower and both projections)
    term.loss(make_ctx(model, batch, 6))
    heads = model.heads["self_distill"]
    student = {"vision": model.vision_model, "global_proj": heads.global_proj, "patch_proj": heads.patch_proj}
    for part, module in student.items():
        for name, p in module.named_parameters():
            assert torch.equal(getattr(term.teacher, part).get_parameter(name), p), (part, name)
    assert int(term.teacher.started) == 1

    def teacher_means(batch):  # the teacher's mean outputs over the batch (all patches for the patch head)
        with torch.no_grad():
            t_out = term.teacher.vision(ref_normalize(batch["image"]), patch_drop=0.0)
            glob = torch.stack([ref_head(term.teacher.global_proj, e) for e in t_out.embeds]).mean(0)
            tokens = t_out.last_hidden_state.flatten(0, 1)
            return glob, torch.stack([ref_head(term.teacher.patch_proj, x) for x in tokens]).mean(0)

    # the centers start at the first batch's means
    mean_glob, mean_patch = teacher_means(batch)
    torch.testing.assert_close(term.teacher.center_global, mean_glob, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(term.teacher.center_patch, mean_patch, rtol=1e-9, atol=1e-12)

    # the optimizer moves the student; after the step: t = m t + (1 - m) s, m = 0.9 at the first step
    with torch.no_grad():
        old = {k: v.clone() for k, v in term.teacher.state_dict().items()}
        for p in model.parameters():
            p.add_(0.01)
    term.after_step(model, 6)
    sd = term.teacher.state_dict()
    for part, module in student.items():
        for name, p in module.named_parameters():
            want = 0.9 * old[f"{part}.{name}"] + 0.1 * p.detach()
            torch.testing.assert_close(sd[f"{part}.{name}"], want, rtol=1e-12, atol=1e-12)
    # the next step's batch moves the centers: c = 0.8 c + 0.2 mean, after that step's update
    other = random_batch(cfg, seed=9)
    mean_glob2, mean_patch2 = teacher_means(other)
    term.loss(make_ctx(model, other, 7))
    torch.testing.assert_close(term.teacher.center_global, mean_glob, rtol=1e-9, atol=1e-12)  # not yet
    term.after_step(model, 7)
    torch.testing.assert_close(term.teacher.center_global, 0.8 * mean_glob + 0.2 * mean_glob2, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(term.teacher.center_patch, 0.8 * mean_patch + 0.2 * mean_patch2, rtol=1e-7, atol=1e-9)
    # momentum: m0 at the first step on, m1 at the last, half a cosine between; fixed when m0 = m1
    assert ema_momentum(0.9, 1.0, 6, 6, 10) == pytest.approx(0.9)
    assert ema_momentum(0.9, 1.0, 8, 6, 10) == pytest.approx(0.95)
    assert ema_momentum(0.9, 1.0, 9, 6, 10) == pytest.approx(1.0 - 0.1 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert ema_momentum(0.9, 1.0, 10, 6, 10) == pytest.approx(1.0)
    assert ema_momentum(0.99, 0.99, 8, 6, 10) == pytest.approx(0.99)
    # the state round-trips (what a checkpoint holds)
    state = term.state_dict()
    _, _, fresh = tiny_setup(cfg)
    fresh.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in fresh.teacher.state_dict().items())


def test_mask_is_drawn_for_the_global_batch():
    P, M = 16, 8
    whole = patch_mask(0, 7, 6, P, M, rank=0, b=6)
    assert whole.sum(1).tolist() == [M] * 6
    halves = torch.cat([patch_mask(0, 7, 6, P, M, rank=r, b=3) for r in range(2)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, patch_mask(0, 8, 6, P, M, rank=0, b=6))  # a new mask each step


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_transform_adds_local_crops_after_the_train_crop(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    data = png(pixels)
    plain = TrainTransform(16).from_bytes(data, seed=3)
    views = TrainTransform(16, local_crops=2, local_scale=(0.1, 0.3)).from_bytes(data, seed=3)
    assert views.shape == (3, 3, 16, 16) and views.dtype == torch.uint8
    assert torch.equal(views[0], plain)  # the train crop is unchanged
    assert not torch.equal(views[1], views[2])
    # each local crop is its own box: small (scale 0.1-0.3 of the image) and seeded by (seed, index)
    t = TrainTransform(16, local_crops=2, local_scale=(0.1, 0.3))
    boxes = t.boxes(40, 48, seed=3)
    for _, _, h, w in boxes[1:]:
        assert 0.1 * 40 * 48 * 0.9 <= h * w <= 0.3 * 40 * 48 * 1.1
    assert torch.equal(TrainTransform(16, local_crops=2, local_scale=(0.1, 0.3)).from_bytes(data, seed=3), views)

    # the loader ships them as batch["local_crops"] (b, n, 3, S, S) beside the train crops
    with ShardWriter(str(tmp_path), samples_per_shard=4) as w:
        for i in range(8):
            w.write({"__key__": f"{i:06d}", "png": png(np.roll(pixels, i, axis=0)), "txt": f"item {i}"})
    for num_streams in (0, 2):  # the per-rank loader and the global-order streams
        cfg = DataConfig(num_workers=0, num_streams=num_streams)
        cfg.train = TrainDataConfig(urls=os.path.join(str(tmp_path), "shard-{000000..000001}.tar"), shuffle_buffer=2,
                                    image_key="png", local_crops=2)  # fmt: skip
        batch = next(iter(build_train_loader(cfg, tokenizer=Tokenizer(context_length=8), image_size=16, batch_size=4,
                                             rank=0, world_size=1, seed=0)))  # fmt: skip
        assert batch["image"].shape == (4, 3, 16, 16)
        assert batch["local_crops"].shape == (4, 2, 3, 16, 16) and batch["local_crops"].dtype == torch.uint8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["loss.terms.self_distill.start_fraction=1.0"], "loss.terms.self_distill.start_fraction"),
        (["loss.terms.self_distill.momentum=1.5"], "loss.terms.self_distill.momentum"),
        (["loss.terms.self_distill.momentum_end=-0.1"], "loss.terms.self_distill.momentum_end"),
        (["loss.terms.self_distill.prototypes=0"], "loss.terms.self_distill.prototypes"),
        (["loss.terms.self_distill.teacher_temp=0"], "loss.terms.self_distill.teacher_temp"),
        (["loss.terms.self_distill.mask_ratio=1.0"], "loss.terms.self_distill.mask_ratio"),
        (["loss.terms.self_distill.silc_weight=-1"], "loss.terms.self_distill.silc_weight"),
        (["data.train.local_crops=0"], "data.train.local_crops"),
        (["data.train.local_crop_scale=[0.5,0.1]"], "data.train.local_crop_scale"),
        (["model.lock_image=true"], "model.lock_image"),
    ],
)
def test_config_errors_name_the_keys(extra, message):
    from mmpretrain.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message.replace(".", r"\.")):
        tiny_cfg(extra)


def test_needs_a_siglip_model():
    from mmpretrain.config import ConfigError, load_config

    with pytest.raises((ValueError, ConfigError), match="loss.terms.self_distill"):
        load_config(None, ["model.name=tiny", "data.synthetic.root=unused", "loss.terms.clip.weight=1.0",
                           "data.train.local_crops=1", "loss.terms.self_distill.weight=1.0"], world_size=1)  # fmt: skip


def test_resume_names_a_missing_or_foreign_objective_state(tmp_path):
    """A checkpoint of a run whose objective keeps state must hold objective_state.pt; its keys must be this run's."""
    from mmpretrain.checkpoint import OBJECTIVE_STATE, resume

    cfg = tiny_cfg()
    _, objective, term = tiny_setup(cfg, torch.float32)
    step_dir = tmp_path / "checkpoints" / "step_3"
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text('{"step": 3}')

    class Engine:  # stands in for DeepSpeed's: the weights load, nothing else matters here
        def load_checkpoint(self, root, tag, **kw):
            return os.path.join(root, tag), {}

    with pytest.raises(ValueError, match=f"{OBJECTIVE_STATE} is missing.*self_distill"):
        resume(Engine(), str(tmp_path), rank=0, tag="step_3", objective=objective)
    state = objective.state_dict()
    torch.save({**state, "other.x": torch.zeros(1)}, step_dir / OBJECTIVE_STATE)
    with pytest.raises(ValueError, match="other"):
        resume(Engine(), str(tmp_path), rank=0, tag="step_3", objective=objective)
    state["self_distill.center_patch"] = torch.full_like(state["self_distill.center_patch"], 0.5)
    torch.save(state, step_dir / OBJECTIVE_STATE)
    assert resume(Engine(), str(tmp_path), rank=0, tag="step_3", objective=objective) == {"step": 3}
    assert term.teacher.center_patch.eq(0.5).all()
