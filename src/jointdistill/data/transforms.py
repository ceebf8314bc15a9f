"""Joint augmentation: one random draw applied identically to image, labels, depth and, with a teacher-output
cache, to the teachers' cached feature maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Draw:
    """One augmentation: scale the (h, w) sample to (nh, nw), pad to at least the crop, crop at (top, left),
    flip or not."""

    h: int
    w: int
    s: float
    nh: int
    nw: int
    top: int
    left: int
    flip: bool


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

    def draw(self, h: int, w: int, g: torch.Generator) -> Draw:
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=g).item()
        nh, nw = (max(1, round(h * s)), max(1, round(w * s))) if abs(s - 1.0) > 1e-6 else (h, w)
        ch, cw = self.crop
        ph, pw = max(nh, ch), max(nw, cw)
        top = int(torch.randint(0, ph - ch + 1, (), generator=g))
        left = int(torch.randint(0, pw - cw + 1, (), generator=g))
        flip = self.hflip and torch.rand((), generator=g).item() < 0.5
        return Draw(h, w, s, nh, nw, top, left, flip)

    def apply(self, d: Draw, image, label, depth, ignore_index: int = 255):
        if abs(d.s - 1.0) > 1e-6:
            image = F.interpolate(
                image[None], size=(d.nh, d.nw), mode="bilinear", align_corners=False, antialias=d.s < 1
            )[0]
            label = F.interpolate(label[None, None].float(), size=(d.nh, d.nw), mode="nearest-exact")[0, 0].long()
            depth = F.interpolate(depth[None], size=(d.nh, d.nw), mode="nearest-exact")[0] / d.s
        ch, cw = self.crop
        ph, pw = max(0, ch - d.nh), max(0, cw - d.nw)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
            depth = F.pad(depth, (0, pw, 0, ph), value=0.0)
        image = image[:, d.top : d.top + ch, d.left : d.left + cw]
        label = label[d.top : d.top + ch, d.left : d.left + cw]
        depth = depth[:, d.top : d.top + ch, d.left : d.left + cw]
        if d.flip:
            image, label, depth = image.flip(-1), label.flip(-1), depth.flip(-1)
        return image.contiguous(), label.contiguous(), depth.contiguous()

    def warp_features(self, d: Draw, features: torch.Tensor, stride: int = 8) -> torch.Tensor:
        """The same geometry on a feature map (C, ⌈h/stride⌉, ⌈w/stride⌉) of the un-augmented image: the map
        an encoder of that stride would give on the augmented crop, approximated by resampling (bilinear at
        each output cell's centre; zeros over padding)."""
        ch, cw = self.crop
        gh, gw = math.ceil(ch / stride), math.ceil(cw / stride)
        # cell centres in crop pixels → scaled-image pixels → original pixels → grid_sample's [-1, 1]
        ys = ((torch.arange(gh) + 0.5) * ch / gh + d.top) * d.h / d.nh
        xs = ((torch.arange(gw) + 0.5) * cw / gw + d.left) * d.w / d.nw
        # the map's fh cells span fh·stride pixels (a little more than h when h is no multiple of the stride)
        fh, fw = features.shape[-2:]
        grid = torch.stack(torch.meshgrid(2 * xs / (fw * stride) - 1, 2 * ys / (fh * stride) - 1, indexing="xy"), -1)
        out = F.grid_sample(
            features[None].float(), grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
        return out.flip(-1).contiguous() if d.flip else out

    def __call__(self, image, label, depth, g: torch.Generator, ignore_index: int = 255):
        _, h, w = image.shape
        return self.apply(self.draw(h, w, g), image, label, depth, ignore_index)

    @classmethod
    def from_params(cls, augment, height: int, width: int) -> JointTransform:
        crop = (augment.crop_height or height, augment.crop_width or width)
        return cls(crop=crop, scale=(augment.scale_min, augment.scale_max), hflip=augment.hflip)
