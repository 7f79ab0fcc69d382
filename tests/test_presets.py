"""The evaluation preset (classifier.presets.EvalPreset): torchvision's resize, crop and
normalisation, computed in fewer steps, for every kind of input torchvision's transforms take."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from classifier.artifact import Preprocessing

PREPROCESSING = Preprocessing(crop_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def composed(preprocessing: Preprocessing) -> v2.Compose:
    """The same steps as torchvision's transforms, composed."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(preprocessing.resize_size, interpolation=v2.InterpolationMode(preprocessing.interpolation),
                  antialias=True),
        v2.CenterCrop(preprocessing.crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
    ])


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(2) if channels == 1 else pixels, mode)


def assert_as_composed(image: object, preprocessing: Preprocessing = PREPROCESSING) -> torch.Tensor:
    tensor = preprocessing.eval_preset()(image)
    expected = composed(preprocessing)(image).as_subclass(torch.Tensor)
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32
    assert tensor.shape == (3, preprocessing.crop_size, preprocessing.crop_size)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-5)
    return tensor


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(640, 427), (224, 1000), (256, 256), (100, 80)])
def test_an_rgb_image_gives_what_torchvisions_composed_transforms_give(interpolation: str,
                                                                       size: tuple[int, int]) -> None:
    assert_as_composed(noise(*size), dataclasses.replace(PREPROCESSING, interpolation=interpolation))


def test_a_greyscale_image_is_normalised_into_three_channels_as_torchvision_does() -> None:
    assert_as_composed(noise(300, 260, "L"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float_tensor_is_taken_as_already_scaled_and_left_unchanged(dtype: torch.dtype) -> None:
    """Float pixels in [0, 1] are not divided by 255 again, and the caller's tensor (which the
    resize and crop of a 256-pixel image would only view) is not written into."""
    pixels = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0), dtype=dtype)
    before = pixels.clone()
    tensor = assert_as_composed(pixels)
    assert torch.equal(pixels, before)
    assert tensor.untyped_storage().data_ptr() != pixels.untyped_storage().data_ptr()
