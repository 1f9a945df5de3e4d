"""ImageNet-C-style corruptions: each deterministic, changing the image, stronger with
severity; the colour ones against Python's own float64 HSV conversion (colorsys)."""

import colorsys

import numpy as np
import pytest
import torch

from attndrift.data.corruptions import CORRUPTIONS, corrupt
from attndrift.data.registry import load_task

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur"}


@pytest.fixture(scope="module")
def images():
    return load_task("shapes-objects", "test").images[:12]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_deterministic_and_changes_the_image(name, images):
    out = corrupt(images, name, 3, seed=0)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, corrupt(images, name, 3, seed=0))
    changed = (out.int() - images.int()).abs().float().mean(dim=(1, 2, 3))
    assert (changed > 0.5).all(), changed  # every image, not just on average
    if name in RANDOM:
        assert not torch.equal(out, corrupt(images, name, 3, seed=1))
    if name != "saturate":  # severities 1-2 desaturate, 3-5 saturate: not one direction
        weak = (corrupt(images, name, 1).float() - images.float()).abs().mean()
        strong = (corrupt(images, name, 5).float() - images.float()).abs().mean()
        assert strong > weak


def test_contrast_is_the_closed_form(images):
    x = images.numpy().astype(np.float64) / 255.0
    means = x.mean(axis=(2, 3), keepdims=True)
    expected = np.clip(np.rint(((x - means) * 0.2 + means) * 255.0), 0, 255)
    got = corrupt(images, "contrast", 3).numpy()
    assert np.abs(got - expected).max() <= 1  # float32 vs float64 rounding at .5


@pytest.mark.parametrize(("name", "severity", "edit"), [
    ("brightness", 2, lambda h, s, v: (h, s, min(1.0, v + 0.2))),
    ("saturate", 1, lambda h, s, v: (h, min(1.0, s * 0.3), v)),
    ("saturate", 4, lambda h, s, v: (h, min(1.0, s * 5 + 0.1), v)),
])
def test_hsv_corruptions_match_colorsys(name, severity, edit, images):
    x = images[:3].numpy().astype(np.float64) / 255.0
    got = corrupt(images[:3], name, severity).numpy()
    expected = np.empty_like(x)
    for i in range(x.shape[0]):
        for r in range(x.shape[2]):
            for c in range(x.shape[3]):
                rgb = colorsys.hsv_to_rgb(*edit(*colorsys.rgb_to_hsv(*x[i, :, r, c])))
                expected[i, :, r, c] = rgb
    expected = np.clip(np.rint(expected * 255.0), 0, 255)
    assert np.abs(got - expected).max() <= 1


def test_bad_arguments_are_refused(images):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match=r"severity must be 1\.\.5"):
        corrupt(images, "contrast", 6)
