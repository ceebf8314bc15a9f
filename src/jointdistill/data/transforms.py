"""Joint augmentation: one random draw applied identically to image, labels and depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class JointTransform:
    """Random scale, then a random crop (padding when the scaled image is smaller), then a random flip.

    Depth values are divided by the scale factor: zooming in by s makes the scene look s times closer
    (the convention of the MTAN/LibMTL NYUv2 pipelines). Labels and depth are resized by nearest
    neighbour so no class id or depth value is invented.
    """

    crop: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True

    def __call__(self, image, label, depth, g: torch.Generator, ignore_index: int = 255):
        _, h, w = image.shape
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=g).item()
        if abs(s - 1.0) > 1e-6:
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=s < 1)[0]
            label = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].long()
            depth = F.interpolate(depth[None], size=(nh, nw), mode="nearest-exact")[0] / s
        ch, cw = self.crop
        _, h, w = image.shape
        ph, pw = max(0, ch - h), max(0, cw - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
            depth = F.pad(depth, (0, pw, 0, ph), value=0.0)
            h, w = h + ph, w + pw
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        image = image[:, top:top + ch, left:left + cw]
        label = label[top:top + ch, left:left + cw]
        depth = depth[:, top:top + ch, left:left + cw]
        if self.hflip and torch.rand((), generator=g).item() < 0.5:
            image, label, depth = image.flip(-1), label.flip(-1), depth.flip(-1)
        return image.contiguous(), label.contiguous(), depth.contiguous()

    @classmethod
    def from_params(cls, augment, height: int, width: int) -> JointTransform:
        crop = (augment.crop_height or height, augment.crop_width or width)
        return cls(crop=crop, scale=(augment.scale_min, augment.scale_max), hflip=augment.hflip)
