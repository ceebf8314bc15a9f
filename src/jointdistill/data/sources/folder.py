"""A user's own data as a `Source` (``prepare.dataset: folder``).

Layout under ``prepare.root``::

    classes.yaml            # or classes.json: the class table (below)
    train/images/STEM.png   # RGB, .png/.jpg/.jpeg
    train/labels/STEM.png   # class ids (8- or 16-bit PNG); ignore_index where unlabeled
    train/depth/STEM.png    # 16-bit PNG in millimetres (0 = invalid), or STEM.npy float metres
    test/…                  # optional, same layout; without it prepare.test_fraction of train is the test split
    raw/STEM.png            # optional: frames nobody labelled (your raw footage), .png/.jpg/.jpeg; they form the
                            # unlabelled split, where the teachers' predictions supervise the student

An image in ``train/images`` without its label or depth file is an error, not a raw frame: a raw frame is one
you put in ``raw/``, so a missing file never quietly turns a labelled frame into an unlabelled one.

The class table::

    classes: [road, building, {name: person, color: [220, 20, 60]}, …]   # id = position
    ignore_index: 255        # optional
    depth_png_scale: 0.001   # optional: metres per unit of a depth PNG (default millimetres)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.readers import load_table, parse_classes, read_png_array, read_rgb
from jointdistill.data.sources.registry import register
from jointdistill.data.split import hash_fraction
from jointdistill.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_class_table(root: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...], int, float]:
    for name in ("classes.yaml", "classes.yml", "classes.json"):
        path = root / name
        if path.is_file():
            break
    else:
        raise DataError(f"{root}: no classes.yaml (or classes.json) class table; see `jointdistill prepare --help`")
    table = load_table(path)
    names, colors = parse_classes(table, path)
    ignore = int(table.get("ignore_index", 255))
    if ignore < len(names) or ignore > 65535:
        raise DataError(f"{path}: ignore_index {ignore} collides with a class id (0..{len(names) - 1})")
    scale = float(table.get("depth_png_scale", 0.001))
    if not scale > 0:
        raise DataError(f"{path}: depth_png_scale must be > 0")
    return names, colors, ignore, scale


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in suffixes:
            if f.stem in found:
                raise DataError(f"{folder}: two files for {f.stem!r} ({found[f.stem].name}, {f.name})")
            found[f.stem] = f
    return found


@register("folder")
class FolderSource:
    name = "folder"

    def __init__(self, params: PrepareParams, seed: int):
        self.params, self.seed = params, seed
        self.root = Path(params.root or "")
        if not self.root.is_dir():
            raise DataError(f"prepare.root {self.root}: no such folder")
        self.classes, self.palette, self.ignore_index, self.depth_scale = read_class_table(self.root)
        self._files: dict[str, tuple[Path, ...]] = {}  # (image, label, depth), or (image,) for a raw frame

    def list(self) -> list[SampleRef]:
        has_test = (self.root / "test" / "images").is_dir()
        refs = []
        for split in ("train", "test") if has_test else ("train",):
            base = self.root / split
            images = _by_stem(base / "images", IMAGE_SUFFIXES)
            labels = _by_stem(base / "labels", (".png",))
            depths = _by_stem(base / "depth", (".png", ".npy"))
            if not images:
                raise DataError(f"{base / 'images'}: no images (.png/.jpg)")
            for stem in sorted((set(labels) | set(depths)) - set(images)):
                raise DataError(f"{base}: {stem!r} has a label or depth file but no image in {base / 'images'}")
            for stem, image in images.items():
                if stem not in labels:
                    raise DataError(f"{image}: no label file {base / 'labels' / (stem + '.png')}")
                if stem not in depths:
                    raise DataError(f"{image}: no depth file in {base / 'depth'} (.png in mm, or .npy in m)")
                sid = f"{split}/{stem}"
                source_split = split
                if not has_test:
                    source_split = (
                        "test" if hash_fraction(sid, self.seed, "folder-test") < self.params.test_fraction else "train"
                    )
                self._files[sid] = (image, labels[stem], depths[stem])
                refs.append(
                    SampleRef(
                        sid,
                        source_split,
                        tuple(str(p.relative_to(self.root)) for p in (image, labels[stem], depths[stem])),
                    )
                )
        for stem, image in _by_stem(self.root / "raw", IMAGE_SUFFIXES).items():
            sid = f"raw/{stem}"
            self._files[sid] = (image,)
            refs.append(SampleRef(sid, "train", (str(image.relative_to(self.root)),), tasks=()))
        return refs

    def load(self, ref: SampleRef) -> Sample:
        files = self._files[ref.sample_id]
        if len(files) == 1:  # a raw frame: no label of any task
            image = read_rgb(files[0])
            return Sample(
                ref.sample_id,
                image,
                np.full(image.shape[:2], self.ignore_index, np.int64),
                np.zeros(image.shape[:2], np.float32),
            )
        image_path, label_path, depth_path = files
        image = read_rgb(image_path)
        label = read_png_array(label_path)
        if depth_path.suffix == ".npy":
            try:
                depth = np.load(depth_path, allow_pickle=False).astype(np.float32)
            except (OSError, ValueError) as exc:
                raise DataError(f"{depth_path}: unreadable .npy ({exc})") from None
            depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
        else:
            depth = read_png_array(depth_path).astype(np.float32) * self.depth_scale
        for what, arr, path in (("label", label, label_path), ("depth", depth, depth_path)):
            if arr.shape[:2] != image.shape[:2]:
                raise DataError(
                    f"{path}: {what} is {arr.shape[1]}×{arr.shape[0]}, its image "
                    f"{image_path.name} is {image.shape[1]}×{image.shape[0]}"
                )
        return Sample(ref.sample_id, image, label, depth)

    def describe(self) -> dict:
        listing = hashlib.sha256()
        for sid, files in sorted(self._files.items()):
            for f in files:
                st = f.stat()
                listing.update(f"{sid}:{f.name}:{st.st_size}\n".encode())
        return {
            "root": str(self.root.resolve()),
            "classes_file": "classes.yaml",
            "files": sum(len(f) for f in self._files.values()),
            "listing_sha256": listing.hexdigest(),
        }
