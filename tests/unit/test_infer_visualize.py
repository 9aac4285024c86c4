"""pipeline.show.draw.render_overlay: small images upscaled, photos shrunk, captions legible."""

from __future__ import annotations

import torch

from pipeline.instances import Instances
from pipeline.show.draw import label_colors, render_overlay


def one_square(h: int, w: int) -> Instances:
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    y0, y1, x0, x1 = h // 2, 3 * h // 4, w // 4, w // 2
    masks[0, y0:y1, x0:x1] = True
    return Instances((h, w), torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), torch.tensor([0.9]),
                     torch.tensor([1]), masks)


def caption_pixels(out: torch.Tensor) -> int:
    """Pixels of the label's colour (the caption background) and white text: both come from the caption."""
    color = torch.tensor(label_colors(3)[1], dtype=torch.uint8)[:, None, None]
    return int(((out == color).all(0)).sum()) + int(((out == 255).all(0)).sum())


def test_small_image_is_upscaled_with_a_legible_caption():
    image = torch.full((3, 64, 48), 30, dtype=torch.uint8)
    out = render_overlay(image, one_square(64, 48), ["square", "bar"], long_side=1280)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 1280, 960)
    # A caption ~28 px high: thousands of pixels, where the old 11-px bitmap font gave ~200.
    assert caption_pixels(out) > 3000
    # The mask is drawn where the square is, at the new scale.
    centre = out[:, int(1280 * 0.62), int(960 * 0.37)]
    assert not torch.equal(centre, torch.tensor([30, 30, 30], dtype=torch.uint8))
    plain = render_overlay(image, one_square(64, 48), ["square", "bar"], score_thresh=0.95)
    assert tuple(plain.shape) == (3, 1280, 960) and int((plain != 30).sum()) == 0  # nothing scored >= 0.95


def test_a_12mp_photo_is_drawn_at_a_readable_size():
    image = torch.full((3, 3000, 4000), 200, dtype=torch.uint8)
    out = render_overlay(image, one_square(3000, 4000), ["square"], long_side=1280)
    assert tuple(out.shape) == (3, 960, 1280)
    assert caption_pixels(out) > 3000
