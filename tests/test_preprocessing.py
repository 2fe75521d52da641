"""The evaluation recipe's one home: the dict a checkpoint stores and the dataclass everything reads agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.data.imageio import cache_side
from cxr.models.classifier import preprocessing
from cxr.data.preprocessing import Preprocessing


@pytest.mark.parametrize("arch, size", [("resnet50", 32), ("vit_b_16", 64), ("mobilenet_v2", 48)])
def test_the_stored_dict_round_trips_and_names_the_decoded_square(arch, size):
    stored = preprocessing(arch, size)
    recipe = Preprocessing.from_dict({**stored, "steps": ["ignored"], "square_side": 0})  # model.json's extras
    assert recipe.as_dict() == stored
    assert recipe.square_side == cache_side(size, stored["resize"]) >= stored["resize"] > size


def test_transform_centre_crops_and_normalises_each_channel():
    recipe = Preprocessing(image_size=4, resize=6, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    squares = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6) * 7  # already at `resize`: no interpolation
    inputs = recipe.transform()(squares)
    assert inputs.shape == (1, 3, 4, 4)
    crop = squares[0, 0, 1:5, 1:5].float() / 255  # round((6 - 4) / 2) = 1 pixel off each side
    for channel in range(3):
        expected = (crop - recipe.mean[channel]) / recipe.std[channel]
        np.testing.assert_allclose(inputs[0, channel].numpy(), expected.numpy(), rtol=1e-6)
