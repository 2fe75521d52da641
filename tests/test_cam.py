import numpy as np
import pytest
import torch
from PIL import Image

from cxr.evaluate import cam
from cxr.models.classifier import build_model, preprocessing

# ResNets downsample 32x: 64 px is the smallest size whose last stage is more than one cell (2x2).
# ViT-B/16 at 32 px has a 2x2 grid of patches.
CASES = [("resnet50", 64), ("vit_b_16", 32)]


@pytest.mark.parametrize(("arch", "size"), CASES)
def test_grad_cam_has_image_size_and_unit_range_through_a_frozen_backbone(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, weights="none", trainable_blocks=0, image_size=size).train()
    images = torch.randn(2, 3, size, size)
    heat_maps = cam.grad_cam(model, images, targets=[1, 3])
    assert heat_maps.shape == (2, size, size)
    assert heat_maps.min() >= 0 and heat_maps.max() <= 1
    assert heat_maps.max() > 0.99  # min-max scaled, so not a blank map: gradients reached the target layer
    assert model.training and not model.backbone.training  # modes restored; a frozen backbone stays in eval
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_follows_the_target_class():
    torch.manual_seed(0)
    model = build_model("vit_b_16", weights="none", trainable_blocks=0, image_size=32).eval()
    image = torch.randn(1, 3, 32, 32)
    first, second = cam.grad_cam(model, image.repeat(2, 1, 1, 1), targets=[0, 2])
    assert not np.allclose(first, second)
    predicted = model(image).argmax(1).item()
    np.testing.assert_allclose(cam.grad_cam(model, image)[0], cam.grad_cam(model, image, [predicted])[0])


def test_vit_tokens_to_grid_drops_the_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class token + 2x2 patches, D=3
    grid = cam.vit_tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    torch.testing.assert_close(grid[0, :, 0, 1], tokens[0, 2])  # patch 1 (row 0, column 1) is token 2
    with pytest.raises(ValueError, match="square"):
        cam.vit_tokens_to_grid(tokens[:, :4])


def test_overlay_png_shows_the_crop_beside_its_heat_map(tmp_path):
    prep = preprocessing("resnet50", 32)
    mean, std = torch.tensor(prep["mean"]).view(3, 1, 1), torch.tensor(prep["std"]).view(3, 1, 1)
    display = cam.as_display(((0.5 - mean) / std).expand(3, 32, 32), prep)  # a mid-grey model input
    np.testing.assert_allclose(display, 0.5, atol=1e-6)
    assert display.shape == (32, 32, 3) and 0 <= display.min() and display.max() <= 1
    heat_map = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    written = cam.save_overlay(display, heat_map, tmp_path / "sub" / "x_cam.png")
    panel = cam.PANEL_MIN
    with Image.open(written) as image:
        assert image.size == cam.overlay_size(32) == (2 * panel + cam.BAR_WIDTH, panel + cam.CAPTION_HEIGHT)
        pixels = np.asarray(image)
    left, right = pixels[cam.CAPTION_HEIGHT:, :panel], pixels[cam.CAPTION_HEIGHT:, panel:2 * panel]
    assert np.ptp(left) <= 1 and np.ptp(right) > 50  # plain grey crop beside a coloured overlay, at readable size
    bar = pixels[cam.CAPTION_HEIGHT:, 2 * panel + 4:2 * panel + 20]
    np.testing.assert_array_equal(bar[0, 0], cam.colour_bar(panel)[0, 0])  # the colour bar: 1 (red) at the top
    assert bar[0, 0, 0] > 100 > bar[0, 0, 2] and bar[-1, 0, 2] > 100 > bar[-1, 0, 0]  # and 0 (blue) at the bottom
    assert pixels[:cam.CAPTION_HEIGHT].max() > 200  # the caption strip holds text


@pytest.mark.parametrize("arch", ["resnet50", "vit_b_16"])
def test_grad_cam_of_a_compiled_backbone_is_the_eager_one(arch):
    """``--compile`` compiles the backbone; Grad-CAM runs it eagerly (its hooks fire, its backward runs twice)."""
    torch.manual_seed(0)
    model = build_model(arch, weights="none", trainable_blocks=0, image_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    eager = cam.grad_cam(model, images, targets=[1, 2])
    model.backbone.compile(backend="aot_eager")
    with torch.no_grad():
        model(images)  # traced once, as evaluation does before the figures
    assert np.allclose(cam.grad_cam(model, images, targets=[1, 2]), eager, atol=1e-5)
