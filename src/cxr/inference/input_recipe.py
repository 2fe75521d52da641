"""What an exported model's ``model.json`` says about its input: every step ``cxr predict`` takes from a file to the
network's input tensor, in order, so a reader without this package can repeat them (docs/export.md does, and
``tests/test_input_recipe.py`` checks that it gets ``cxr predict``'s probabilities)."""

from __future__ import annotations

from typing import Any

from cxr.data.preprocessing import Preprocessing


def input_steps(prep: dict[str, Any]) -> dict[str, Any]:
    """``square_side`` (the side of the decoded square) and ``steps``: the decoding and resampling of
    :func:`cxr.data.imageio.decode_image` and the crop and normalisation of
    :meth:`cxr.data.preprocessing.Preprocessing.transform`."""
    recipe = Preprocessing.from_dict(prep)
    size, resize, side = recipe.image_size, recipe.resize, recipe.square_side
    resample = (f"3. scale to 0..1 (divide by 255, float32), then resize the {side} x {side} square to {resize} x "
                f"{resize}, bilinear with antialiasing (torch.nn.functional.interpolate(antialias=True); PIL's "
                "resize(BILINEAR) of a mode 'F' image gives the same), clipped to 0..1"
                if side != resize else "3. scale to 0..1 (divide by 255, float32); no second resize")
    return {
        "square_side": side,
        "steps": [
            f"1. decode to 8-bit grayscale: a JPEG through libjpeg's draft mode (PIL Image.draft('L', ({side}, "
            f"{side}))), which decodes in grayscale at the smallest of 1/1, 1/2, 1/4, 1/8 scale keeping both sides "
            f">= {side}; EXIF orientation applied (PIL ImageOps.exif_transpose); 16-bit and float images mapped "
            "linearly from their own min..max onto 0..255; DICOM through its VOI LUT or window (else its own "
            "range; MONOCHROME1 inverted); palette or transparent images through RGBA to RGB (alpha dropped); RGB "
            "to grayscale by PIL's convert('L')",
            f"2. square: the shorter side resized to {side} px and the longer side centre-cropped, by PIL "
            f"resize(({side}, {side}), BILINEAR, box=...) of a crop: with s = {side} / min(w, h), W, H = "
            f"max({side}, round(w * s)), max({side}, round(h * s)), left, top = (W - {side}) // 2, (H - {side}) // 2, "
            f"box = (left * w / W, top * h / H, (left + {side}) * w / W, (top + {side}) * h / H); the crop is box "
            "widened by r = ceil(max(1, 1 / s)) + 1 px (floor/ceil, clipped to the image) and the resize's box is "
            "box minus the crop's corner (cxr.data.imageio.frame_square)",
            resample,
            f"4. centre crop {size} x {size} starting at row and column round(({resize} - {size}) / 2) "
            "(Python's round: halves to even)",
            "5. the gray channel repeated on 3 channels, each minus `mean` and divided by `std` (per channel); "
            "layout N x 3 x H x W float32",
        ],
    }
