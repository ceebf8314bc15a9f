"""Cityscapes in its official layout as a `Source` (``prepare.dataset: cityscapes``).

Under ``prepare.root``: ``leftImg8bit/{train,val}/CITY/*_leftImg8bit.png``, ``gtFine/…/*_gtFine_labelIds.png``,
``disparity/…/*_disparity.png`` and ``camera/…/*_camera.json``. Labels: the 7 categories (default) or the
19 training classes (``prepare.cityscapes_classes``), from the official label table; everything else is
ignored (255). Depth in metres from disparity: ``baseline · fx / ((p − 1) / 256)`` for stored values p > 1,
invalid otherwise. The official train split gives train and val; the official val split becomes test (the
official test split has no public labels).

``train_extra`` (the 19,998 frames with coarse labels only), where present, joins as depth-only frames: their
disparity is depth, and their coarse labels are not fine labels, so they carry no segmentation label. There the
seg teacher's predictions supervise the student, and the depth teacher trains on their disparity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.categories import CATEGORIES, CATEGORY_PALETTE
from jointdistill.data.sources.readers import read_png_array, read_rgb
from jointdistill.data.sources.registry import register
from jointdistill.errors import DataError

IGNORE = 255
# The official label table (cityscapesScripts labels.py): id → (name, trainId, category id). Category ids
# 1..7 are flat, construction, object, nature, sky, human, vehicle; 0 is void. License plate (id -1) is
# left out: it never appears in *_labelIds.png.
LABELS = {
    0: ("unlabeled", IGNORE, 0),
    1: ("ego vehicle", IGNORE, 0),
    2: ("rectification border", IGNORE, 0),
    3: ("out of roi", IGNORE, 0),
    4: ("static", IGNORE, 0),
    5: ("dynamic", IGNORE, 0),
    6: ("ground", IGNORE, 0),
    7: ("road", 0, 1),
    8: ("sidewalk", 1, 1),
    9: ("parking", IGNORE, 1),
    10: ("rail track", IGNORE, 1),
    11: ("building", 2, 2),
    12: ("wall", 3, 2),
    13: ("fence", 4, 2),
    14: ("guard rail", IGNORE, 2),
    15: ("bridge", IGNORE, 2),
    16: ("tunnel", IGNORE, 2),
    17: ("pole", 5, 3),
    18: ("polegroup", IGNORE, 3),
    19: ("traffic light", 6, 3),
    20: ("traffic sign", 7, 3),
    21: ("vegetation", 8, 4),
    22: ("terrain", 9, 4),
    23: ("sky", 10, 5),
    24: ("person", 11, 6),
    25: ("rider", 12, 6),
    26: ("car", 13, 7),
    27: ("truck", 14, 7),
    28: ("bus", 15, 7),
    29: ("caravan", IGNORE, 7),
    30: ("trailer", IGNORE, 7),
    31: ("train", 16, 7),
    32: ("motorcycle", 17, 7),
    33: ("bicycle", 18, 7),
}
TRAIN_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
TRAIN_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
SPLITS = {"train": "train", "val": "test"}  # official split → source split


def lookup_table(num_classes: int) -> np.ndarray:
    """labelId (0..255) → class id in the chosen set, IGNORE elsewhere."""
    table = np.full(256, IGNORE, np.uint8)
    for label_id, (_, train_id, category) in LABELS.items():
        table[label_id] = train_id if num_classes == 19 else (category - 1 if category else IGNORE)
    return table


def disparity_to_depth(disparity: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """Stored 16-bit disparity p → metres: baseline·fx / ((p − 1) / 256) where p > 1, else 0 (invalid)."""
    p = disparity.astype(np.float64)
    depth = np.zeros(p.shape, np.float32)
    valid = p > 1
    depth[valid] = baseline * fx / ((p[valid] - 1.0) / 256.0)
    return depth


@register("cityscapes")
class CityscapesSource:
    name = "cityscapes"
    ignore_index = IGNORE

    def __init__(self, params: PrepareParams, seed: int):
        self.params, self.seed = params, seed
        self.root = Path(params.root or "")
        if not (self.root / "leftImg8bit").is_dir():
            raise DataError(
                f"prepare.root {self.root}: expected the official Cityscapes layout (leftImg8bit/, "
                "gtFine/, disparity/, camera/)"
            )
        n = params.cityscapes_classes
        self.classes = TRAIN_CLASSES if n == 19 else CATEGORIES
        self.palette = TRAIN_PALETTE if n == 19 else CATEGORY_PALETTE
        self.table = lookup_table(n)
        self._files: dict[str, tuple[Path, Path | None, Path, Path]] = {}  # image, fine label, disparity, camera

    def list(self) -> list[SampleRef]:
        refs = []
        for split, source_split in SPLITS.items():
            images = sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
            if not images:
                raise DataError(f"{self.root / 'leftImg8bit' / split}: no *_leftImg8bit.png images")
            for image in images:
                city, stem = image.parent.name, image.name.removesuffix("_leftImg8bit.png")
                partners = (
                    self.root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                    self.root / "disparity" / split / city / f"{stem}_disparity.png",
                    self.root / "camera" / split / city / f"{stem}_camera.json",
                )
                for p in partners:
                    if not p.is_file():
                        raise DataError(f"{image}: no partner file {p}")
                sid = f"cityscapes/{split}/{stem}"
                self._files[sid] = (image, *partners)
                refs.append(
                    SampleRef(sid, source_split, tuple(str(p.relative_to(self.root)) for p in (image, *partners)))
                )
        for image in sorted((self.root / "leftImg8bit" / "train_extra").glob("*/*_leftImg8bit.png")):
            city, stem = image.parent.name, image.name.removesuffix("_leftImg8bit.png")
            partners = (  # type: ignore[assignment]  # (disparity, camera): no fine label
                self.root / "disparity" / "train_extra" / city / f"{stem}_disparity.png",
                self.root / "camera" / "train_extra" / city / f"{stem}_camera.json",
            )
            for p in partners:
                if not p.is_file():
                    raise DataError(f"{image}: no partner file {p}")
            sid = f"cityscapes/train_extra/{stem}"
            self._files[sid] = (image, None, *partners)  # type: ignore[assignment]
            rel = tuple(str(p.relative_to(self.root)) for p in (image, *partners))
            refs.append(SampleRef(sid, "train", rel, tasks=("depth",)))
        return refs

    def load(self, ref: SampleRef) -> Sample:
        image_path, label_path, disp_path, camera_path = self._files[ref.sample_id]
        image = read_rgb(image_path)
        if label_path is None:  # train_extra: no fine label
            label_ids = np.zeros(image.shape[:2], np.uint8)  # id 0, "unlabeled": ignore everywhere
        else:
            label_ids = read_png_array(label_path)
        if label_ids.min() < 0 or label_ids.max() > 33:
            raise DataError(f"{label_path}: label ids outside the official table (0..33)")
        try:
            camera = json.loads(camera_path.read_text())
            baseline, fx = float(camera["extrinsic"]["baseline"]), float(camera["intrinsic"]["fx"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{camera_path}: unreadable camera file (needs extrinsic.baseline and intrinsic.fx; {exc})"
            ) from None
        if not (baseline > 0 and fx > 0):
            raise DataError(f"{camera_path}: baseline {baseline} and fx {fx} must be positive")
        disparity = read_png_array(disp_path)
        for what, arr, path in (("labels", label_ids, label_path or image_path), ("disparity", disparity, disp_path)):
            if arr.shape != image.shape[:2]:
                raise DataError(
                    f"{path}: {what} {arr.shape[1]}×{arr.shape[0]}, image {image.shape[1]}×{image.shape[0]}"
                )
        return Sample(ref.sample_id, image, self.table[label_ids], disparity_to_depth(disparity, baseline, fx))

    def describe(self) -> dict:
        listing = hashlib.sha256()
        for sid, files in sorted(self._files.items()):
            listing.update(f"{sid}:{files[0].stat().st_size}\n".encode())
        return {
            "root": str(self.root.resolve()),
            "layout": "official Cityscapes (gtFine, disparity, camera)",
            "classes": len(self.classes),
            "listing_sha256": listing.hexdigest(),
        }
