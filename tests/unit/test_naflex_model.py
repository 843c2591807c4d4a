"""NaFlex with sequence packing in the SigLIP vision tower (float64, SDPA path): a packed batch of images of
different aspect ratios gives each image the features it gets alone (unpacked), forward and gradients; a square
image at the model's grid gives the fixed-size path's features; the resized position table is F.interpolate's."""

import pytest
import torch
import torch.nn.functional as F
from mmpretrain.kernels import PAD_SEGMENT_ID

from mmpretrain.model import ModelConfig, build_model
from mmpretrain.model.naflex import PackedImages, resize_position_grid, segment_ids_for_rows

P = 8  # siglip-tiny: 32 px images, 8 px patches, a 4 x 4 position table
GRIDS = [(2, 6), (4, 4), (5, 3), (1, 7), (3, 2), (6, 2)]  # (h, w) patch grids of aspect ratios 1:3 to 7:1


def patchify(img_CHW):
    """(3, h*p, w*p) -> (h*w, p*p*3): row-major patches, pixels in (row, column, channel) order."""
    C, H, W = img_CHW.shape
    x = img_CHW.reshape(C, H // P, P, W // P, P).permute(1, 3, 2, 4, 0)
    return x.reshape((H // P) * (W // P), P * P * C)


def pack(images, rows, length):
    """images: list of (3, h*p, w*p); rows: lists of image indices per row -> PackedImages."""
    shapes = [[(images[i].shape[1] // P, images[i].shape[2] // P) for i in row] for row in rows]
    patches = torch.zeros(len(rows), length, P * P * 3, dtype=images[0].dtype)
    for b, row in enumerate(rows):
        flat = torch.cat([patchify(images[i]) for i in row]) if row else patches.new_zeros(0, P * P * 3)
        patches[b, : len(flat)] = flat
    return PackedImages(patches, segment_ids_for_rows(shapes, length), shapes)


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="siglip-tiny", attention="sdpa")).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter perturbed: zero biases and unit LayerNorms would hide mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.vision_model.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, h * P, w * P, generator=g, dtype=torch.float64) for h, w in GRIDS]


def test_segment_ids_follow_the_kernel_convention():
    ids = segment_ids_for_rows([[(1, 2), (2, 1)], [(1, 1)]], 6)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[0, 0, 1, 1, PAD_SEGMENT_ID, PAD_SEGMENT_ID], [0] + [PAD_SEGMENT_ID] * 5]


def test_resized_position_table_is_torch_bilinear_antialiased():
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(4, 4, 5, generator=g, dtype=torch.float64)
    assert torch.equal(resize_position_grid(grid, 4, 4), grid.reshape(16, 5))  # the identity at g x g
    for h, w in [(2, 6), (1, 7), (8, 3)]:
        want = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", antialias=True)
        torch.testing.assert_close(resize_position_grid(grid, h, w), want[0].flatten(1).T, rtol=0, atol=1e-12)


def test_packed_features_equal_each_image_alone_forward_and_gradients(tower, images):
    rows = [[0, 1, 3], [2, 4, 5]]  # 12 + 16 + 7 = 35 and 15 + 6 + 12 = 33 patches in rows of 40: padding in both
    packed = pack(images, rows, 40)
    packed.patches_BNK.requires_grad_(True)
    order = [i for row in rows for i in row]
    w_IE = torch.randn(len(order), tower.head.probe.shape[-1], dtype=torch.float64)  # a loss weighting each image

    tower.zero_grad()
    out = tower(packed)
    assert out.embeds.shape == (len(order), 64) and out.last_hidden_state.shape == (2, 40, 64)
    (out.embeds * w_IE).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in tower.named_parameters()}

    tower.zero_grad()
    alone, alone_pix_grads = [], []
    for k, i in enumerate(order):
        one = pack(images, [[i]], GRIDS[i][0] * GRIDS[i][1])  # one image, no padding: unpacked
        one.patches_BNK.requires_grad_(True)
        e = tower(one).embeds
        (e * w_IE[k]).sum().backward()
        alone.append(e.detach()[0])
        alone_pix_grads.append(one.patches_BNK.grad[0])
    torch.testing.assert_close(out.embeds.detach(), torch.stack(alone), rtol=0, atol=1e-12)
    for n, p in tower.named_parameters():
        # LayerNorm runs in float32 even on a float64 model (layers.LayerNorm): its own parameters' gradients are
        # float32 sums over the tokens, in another order packed; every other gradient is float64 through and through
        tol = dict(rtol=1e-5, atol=1e-6) if "norm" in n else dict(rtol=0, atol=1e-10)
        torch.testing.assert_close(packed_grads[n], p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")
    # the pixels' gradients land on each image's own patches; the padding gets none
    grad = packed.patches_BNK.grad
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            n = GRIDS[i][0] * GRIDS[i][1]
            torch.testing.assert_close(grad[b, start : start + n], alone_pix_grads[order.index(i)], rtol=0, atol=1e-12)
            start += n
        assert torch.all(grad[b, start:] == 0)


def test_a_square_image_at_the_model_grid_equals_the_fixed_size_path(tower):
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = tower(imgs).embeds
        got = tower(pack(list(imgs), [[0, 1]], 32)).embeds
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_bad_packed_inputs_name_the_field(tower, images):
    packed = pack(images, [[0]], 16)
    with pytest.raises(ValueError, match="shapes\\[0\\]"):
        tower(PackedImages(packed.patches_BNK, packed.segment_ids_BN, [[(4, 5)]]))
    with pytest.raises(ValueError, match="segment_ids_BN"):
        tower(PackedImages(packed.patches_BNK, packed.segment_ids_BN.long(), packed.shapes))
    with pytest.raises(ValueError, match="patches_BNK"):
        tower(PackedImages(packed.patches_BNK[..., :-1], packed.segment_ids_BN, packed.shapes))
