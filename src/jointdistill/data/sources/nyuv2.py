"""NYUv2 in the preprocessed layout of MTAN and LibMTL as a `Source` (``prepare.dataset: nyuv2``).

Layout under ``prepare.root``: ``{train,val}/{image,label,depth}/N.npy`` — image (288, 384, 3) float in
[0, 1] (or uint8), label (288, 384) with the 13 classes 0..12 and -1 where unlabeled, depth (288, 384[, 1])
in metres, 0 where invalid. That layout's ``val`` folder is the official 654-image test split, so it
becomes ``test`` here; ``train`` (795 images) gives train and val. When ``prepare.root`` is the official
``nyu_depth_v2_labeled.mat`` (or a folder holding it), `nyuv2_mat` reads that instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.nyuv2_mat import CLASSES_13 as CLASSES
from jointdistill.data.sources.nyuv2_mat import MAT_NAME, NYUv2LabeledSource
from jointdistill.data.sources.nyuv2_mat import PALETTE_13 as PALETTE
from jointdistill.data.sources.registry import register
from jointdistill.errors import DataError

SPLITS = {"train": "train", "val": "test"}  # folder → source split


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npy ({exc})") from None


@register("nyuv2")
def make_nyuv2(params: PrepareParams, seed: int):
    """The preprocessed layout, or the official labelled .mat, depending on what ``root`` points at."""
    root = Path(params.root or "")
    if root.suffix.lower() == ".mat":
        if not root.is_file():
            raise DataError(f"prepare.root {root}: no such file")
        return NYUv2LabeledSource(params, seed, root)
    if (root / MAT_NAME).is_file() and not (root / "train" / "image").is_dir():
        return NYUv2LabeledSource(params, seed, root / MAT_NAME)
    return NYUv2Source(params, seed)


class NYUv2Source:
    name = "nyuv2"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, params: PrepareParams, seed: int):
        self.params, self.seed = params, seed
        self.root = Path(params.root or "")
        if not self.root.is_dir():
            raise DataError(f"prepare.root {self.root}: no such folder")
        if not (self.root / "train" / "image").is_dir():
            raise DataError(
                f"{self.root}: expected the preprocessed NYUv2 layout "
                "{train,val}/{image,label,depth}/N.npy (MTAN / LibMTL), or the official "
                "nyu_depth_v2_labeled.mat"
            )

    def _folder(self, ref: SampleRef) -> tuple[Path, str]:
        split, index = ref.sample_id.split("/")[1:]
        return self.root / split, index

    def list(self) -> list[SampleRef]:
        refs = []
        for folder, source_split in SPLITS.items():
            base = self.root / folder
            if not (base / "image").is_dir():
                if folder == "val":
                    raise DataError(f"{base / 'image'}: missing (the official test split)")
                continue
            stems = sorted((p.stem for p in (base / "image").glob("*.npy")), key=lambda s: (len(s), s))
            for stem in stems:
                for part in ("label", "depth"):
                    partner = base / part / f"{stem}.npy"
                    if not partner.is_file():
                        raise DataError(f"{base / 'image' / (stem + '.npy')}: no partner {partner}")
                refs.append(
                    SampleRef(
                        f"nyuv2/{folder}/{stem}",
                        source_split,
                        tuple(f"{folder}/{part}/{stem}.npy" for part in ("image", "label", "depth")),
                    )
                )
        return refs

    def load(self, ref: SampleRef) -> Sample:
        base, stem = self._folder(ref)
        image = _load_npy(base / "image" / f"{stem}.npy")
        label = _load_npy(base / "label" / f"{stem}.npy")
        depth = _load_npy(base / "depth" / f"{stem}.npy")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all() or image.min() < -1e-3 or image.max() > 1 + 1e-3:
                raise DataError(f"{base / 'image' / (stem + '.npy')}: float image values outside [0, 1]")
            image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        if label.dtype.kind == "f":
            if not np.isfinite(label).all() or (label != np.round(label)).any():
                raise DataError(f"{base / 'label' / (stem + '.npy')}: label values are not whole numbers")
        label = label.astype(np.int64)
        label[label < 0] = self.ignore_index  # -1 = unlabeled in the preprocessed files
        depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
        return Sample(ref.sample_id, image, label, depth.astype(np.float32))

    def describe(self) -> dict:
        listing = hashlib.sha256()
        for folder in SPLITS:
            for f in sorted((self.root / folder).glob("*/*.npy")):
                listing.update(f"{f.relative_to(self.root)}:{f.stat().st_size}\n".encode())
        return {
            "root": str(self.root.resolve()),
            "layout": "MTAN/LibMTL preprocessed .npy",
            "listing_sha256": listing.hexdigest(),
        }
