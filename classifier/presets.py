"""Image preprocessing, defined once: training's evaluation and serving use the same preset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def _interpolation(name: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        choices = ", ".join(mode.value for mode in v2.InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; choose one of: {choices}") from None


class EvalPreset:
    """Resize the short side, centre-crop, scale to [0, 1], normalise.

    The steps are torchvision's image kernels called one after the other (not a ``v2.Compose``):
    the same resize and crop, and for 8-bit pixels (what decoding gives) the scaling and
    normalisation folded into one multiply-add. Serving runs this once per image on its pass
    threads, where every Python step holds the interpreter's lock the other threads need.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        resize_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
    ) -> None:
        self._resize = [resize_size]
        self._crop = [crop_size, crop_size]
        self._interpolation = _interpolation(interpolation)
        self._mean, self._std = list(mean), list(std)
        # (pixel / 255 - mean) / std as shift + pixel * scale, per channel.
        std_tensor = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1 / (255 * std_tensor)
        self._shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_tensor

    def __call__(self, image: object) -> torch.Tensor:
        pixels = F.to_image(image).as_subclass(torch.Tensor)  # type: ignore[arg-type]
        pixels = F.resize_image(pixels, self._resize, interpolation=self._interpolation, antialias=True)
        pixels = F.center_crop_image(pixels, self._crop)
        if pixels.dtype != torch.uint8:  # already scaled, or 16-bit: torchvision's own scaling for its type
            scaled = F.to_dtype_image(pixels, torch.float32, scale=True)
            return F.normalize_image(scaled, mean=self._mean, std=self._std)
        # Out of place: the pixels may be a view of the caller's tensor.
        return torch.addcmul(self._shift, pixels.to(torch.float32), self._scale)


_AUTO_AUGMENT = {
    "trivialaugment": lambda interpolation: v2.TrivialAugmentWide(interpolation=interpolation),
    "randaugment": lambda interpolation: v2.RandAugment(interpolation=interpolation),
    "autoaugment": lambda interpolation: v2.AutoAugment(interpolation=interpolation),
}


class TrainPreset:
    """Training augmentation, then scaling to [0, 1] and normalising with torchvision's transforms
    (what :class:`EvalPreset` computes in one step).

    ``augmentation``: ``none`` (resize + centre crop, as in evaluation), ``basic`` (random
    resized crop + horizontal flip), or basic followed by ``trivialaugment``, ``randaugment``
    or ``autoaugment``.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        resize_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        augmentation: str = "basic",
        hflip_prob: float = 0.5,
    ) -> None:
        mode = _interpolation(interpolation)
        steps: list[v2.Transform] = [v2.ToImage()]
        if augmentation == "none":
            steps += [v2.Resize(resize_size, interpolation=mode, antialias=True), v2.CenterCrop(crop_size)]
        else:
            steps.append(v2.RandomResizedCrop(crop_size, interpolation=mode, antialias=True))
            if hflip_prob > 0:
                steps.append(v2.RandomHorizontalFlip(hflip_prob))
            if augmentation in _AUTO_AUGMENT:
                steps.append(_AUTO_AUGMENT[augmentation](mode))
            elif augmentation != "basic":
                raise ValueError(f"unknown augmentation {augmentation!r}")
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        self.transforms = v2.Compose(steps)

    def __call__(self, image: object) -> torch.Tensor:
        return self.transforms(image)
