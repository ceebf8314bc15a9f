"""NYUv2 from its official files (``prepare.dataset: nyuv2`` with ``prepare.root`` at the labelled .mat).

- ``nyu_depth_v2_labeled.mat``: MATLAB v7.3, i.e. HDF5. MATLAB stores arrays column-major, so h5py sees
  every axis reversed: ``images`` (N, 3, W, H) uint8, ``labels`` (N, W, H) with 0 = unlabeled and
  1..894 = the dataset's raw classes, ``depths`` (N, W, H) float metres (in-painted). One frame is read
  at a time, so memory stays bounded by one frame.
- ``splits.mat`` (MATLAB v5, or v7.3): ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based frame numbers.
  ``trainNdxs`` gives train and val, ``testNdxs`` becomes test.
- A class-mapping file from the 894 raw classes to K classes, which the user supplies
  (``prepare.nyuv2_class_map``): ``classMapping13.mat`` / ``classMapping40.mat`` (``mapClass``, values
  1..K, and ``className``), a ``.npy``/``.txt`` vector of 894 values, or YAML/JSON
  ``{classes: [...], map: [894 values] | {raw_id: class}}``. Values are 1..K; 0 leaves that raw class
  unlabeled (ignored).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.readers import default_color, load_table, parse_classes
from jointdistill.errors import DataError

# The 13-class NYUv2 set (Couprie et al. 2013), in the order of the preprocessed labels 0..12.
CLASSES_13 = (
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "picture",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
)
PALETTE_13 = (
    (0, 0, 255),
    (232, 88, 47),
    (0, 217, 0),
    (148, 0, 240),
    (222, 241, 23),
    (255, 205, 205),
    (0, 223, 228),
    (106, 135, 204),
    (116, 28, 41),
    (240, 35, 235),
    (0, 166, 156),
    (249, 139, 0),
    (225, 228, 194),
)
IGNORE = 255
RAW_CLASSES = 894
MAT_NAME = "nyu_depth_v2_labeled.mat"
# The 40 classes of Gupta et al. (2013), in the order of classMapping40 (CLASSES_13: Couprie et al. 2013).
CLASSES_40 = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)


def _h5py():
    import h5py  # imported on use: only this source needs it

    return h5py


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(520)
    # A v7.3 .mat is HDF5 behind a 512-byte MATLAB header; plain HDF5 files start with the signature.
    return head[:8] == b"\x89HDF\r\n\x1a\n" or head[512:520] == b"\x89HDF\r\n\x1a\n"


def _mat_variables(path: Path) -> dict[str, object]:
    """Top-level variables of a .mat of any version: numeric arrays, lists of strings, nested dicts."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        if _is_hdf5(path):
            h5py = _h5py()
            with h5py.File(path, "r") as f:
                return {k: _h5_value(f, f[k]) for k in f if not k.startswith("#")}
        from scipy.io import loadmat

        raw = loadmat(path, simplify_cells=True)  # squeezed arrays; structs and cells as dicts and lists
        return {k: v for k, v in raw.items() if not k.startswith("__")}
    except DataError:
        raise
    except Exception as exc:  # scipy/h5py raise many types for a damaged file
        raise DataError(f"{path}: unreadable .mat ({type(exc).__name__}: {exc})") from None


def _h5_value(f, node):
    h5py = _h5py()
    if isinstance(node, h5py.Group):
        return {k: _h5_value(f, node[k]) for k in node}
    data = node[()]
    if node.attrs.get("MATLAB_class", b"") in (b"char", "char"):
        return "".join(map(chr, np.asarray(data).ravel()))
    if data.dtype == h5py.ref_dtype:  # a cell array: each element is a reference to its own dataset
        return [_h5_value(f, f[ref]) for ref in np.asarray(data).ravel()]
    return np.asarray(data)


def _strings(value) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype.kind in "OUS"):
        items = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) else list(value)
        if items and all(isinstance(s, str) for s in items):
            return [str(s) for s in items]
    return None


def _walk(variables: dict, prefix: str = ""):
    for name, value in variables.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


def _from_mat(path: Path) -> tuple[np.ndarray, list[str] | None]:
    variables = dict(_walk(_mat_variables(path)))
    vectors = {
        n: np.asarray(v).ravel()
        for n, v in variables.items()
        if isinstance(v, np.ndarray) and v.dtype.kind in "iuf" and v.size == RAW_CLASSES
    }
    if not vectors:
        raise DataError(f"{path}: no numeric variable with {RAW_CLASSES} entries (expected e.g. mapClass)")
    preferred = [n for n in vectors if n.split(".")[-1] == "mapClass"]
    if len(preferred) != 1 and len(vectors) != 1:
        raise DataError(
            f"{path}: several {RAW_CLASSES}-entry variables ({', '.join(sorted(vectors))}); "
            "keep only the mapping (mapClass)"
        )
    mapping = vectors[preferred[0] if len(preferred) == 1 else next(iter(vectors))]
    names = None
    for n, v in variables.items():
        if n.split(".")[-1] in ("className", "classNames", "names"):
            names = _strings(v)
    return mapping, names


def _from_table(path: Path) -> tuple[np.ndarray, list[str], tuple]:
    table = load_table(path)
    names, colors = parse_classes(table, path)
    raw = table.get("map")
    mapping = np.zeros(RAW_CLASSES, np.float64)
    try:
        if isinstance(raw, list) and len(raw) == RAW_CLASSES:
            mapping[:] = raw
        elif isinstance(raw, dict):
            for key, value in raw.items():
                if not (str(key).isdigit() and 1 <= int(key) <= RAW_CLASSES):
                    raise DataError(f"{path}: map key {key!r} is not a raw class id 1..{RAW_CLASSES}")
                mapping[int(key) - 1] = value
        else:
            raise DataError(f"{path}: 'map' must be a list of {RAW_CLASSES} values or {{raw_id: class}}")
    except (TypeError, ValueError):
        raise DataError(f"{path}: map values must be numbers 0..K") from None
    return mapping, list(names), colors


def read_class_map(path: Path) -> tuple[np.ndarray, tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """A class-mapping file → (lookup raw id 0..894 → class id or IGNORE, class names, palette)."""
    if not path.is_file():
        raise DataError(f"prepare.nyuv2_class_map {path}: no such file")
    suffix, colors = path.suffix.lower(), None
    if suffix == ".mat":
        mapping, names = _from_mat(path)
    elif suffix in (".yaml", ".yml", ".json"):
        mapping, names, colors = _from_table(path)
    elif suffix in (".npy", ".txt", ".csv"):
        try:
            delimiter = "," if suffix == ".csv" else None
            mapping = np.load(path) if suffix == ".npy" else np.loadtxt(path, delimiter=delimiter)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        mapping, names = np.asarray(mapping).ravel(), None
        if mapping.size != RAW_CLASSES:
            raise DataError(f"{path}: {mapping.size} values; expected one per raw class ({RAW_CLASSES})")
    else:
        raise DataError(f"{path}: unknown class-mapping format (use .mat, .yaml/.json, .npy or .txt)")
    if not np.isfinite(mapping).all() or (mapping != np.round(mapping)).any() or mapping.min() < 0:
        raise DataError(f"{path}: mapping values must be whole numbers 0..K (0 = unlabeled)")
    mapping = mapping.astype(np.int64)
    k = len(names) if names else int(mapping.max())
    if k < 1 or k >= IGNORE:
        raise DataError(f"{path}: {k} classes; expected 1..{IGNORE - 1}")
    if mapping.max() > k:
        raise DataError(f"{path}: mapping value {mapping.max()} beyond its {k} class names")
    if not names:
        names = list(CLASSES_13 if k == 13 else CLASSES_40 if k == 40 else (f"class_{i}" for i in range(k)))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat")
    palette = colors or (PALETTE_13 if k == 13 else tuple(default_color(i) for i in range(k)))
    lookup = np.full(RAW_CLASSES + 1, IGNORE, np.uint8)
    lookup[1:] = np.where(mapping > 0, mapping - 1, IGNORE)
    return lookup, tuple(names), palette


def read_splits(path: Path, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """splits.mat → 0-based (train, test) frame indices, checked against the labelled set's size."""
    variables = dict(_walk(_mat_variables(path)))
    out = []
    for key in ("trainNdxs", "testNdxs"):
        # squeeze_me turns a one-frame split into a scalar
        if key not in variables or not isinstance(variables[key], (np.ndarray, np.number, int, float)):
            raise DataError(f"{path}: no {key} (expected the official splits.mat: trainNdxs, testNdxs)")
        idx = np.asarray(variables[key]).ravel()
        if idx.size == 0 or (idx != np.round(idx)).any() or idx.min() < 1 or idx.max() > n_frames:
            raise DataError(f"{path}: {key} must hold frame numbers 1..{n_frames}")
        out.append(np.unique(idx.astype(np.int64)) - 1)
    if np.intersect1d(out[0], out[1]).size:
        raise DataError(f"{path}: trainNdxs and testNdxs share frames")
    return out[0], out[1]


class NYUv2LabeledSource:
    """The official labelled set; ``dataset: nyuv2`` picks it when ``root`` is (or holds) the .mat."""

    name = "nyuv2"
    ignore_index = IGNORE

    def __init__(self, params: PrepareParams, seed: int, mat: Path):
        self.params, self.seed, self.mat = params, seed, mat
        if not params.nyuv2_class_map:
            raise DataError(
                f"{mat}: the official labels are {RAW_CLASSES} raw classes; set prepare.nyuv2_class_map "
                "to a mapping file (classMapping13.mat, classMapping40.mat, or YAML {classes, map})"
            )
        self.class_map = Path(params.nyuv2_class_map)
        self.splits = Path(params.nyuv2_splits) if params.nyuv2_splits else mat.parent / "splits.mat"
        self.lookup, self.classes, self.palette = read_class_map(self.class_map)
        self._file = None

    def _open(self):
        if self._file is None:
            if not _is_hdf5(self.mat):
                raise DataError(f"{self.mat}: not a MATLAB v7.3 (HDF5) file; expected the official {MAT_NAME}")
            try:
                self._file = _h5py().File(self.mat, "r")
            except OSError as exc:
                raise DataError(f"{self.mat}: unreadable ({exc})") from None
            missing = [k for k in ("images", "labels", "depths") if k not in self._file]
            if missing:
                raise DataError(f"{self.mat}: no {', '.join(missing)} (expected the official labelled set)")
            images, labels, depths = (self._file[k] for k in ("images", "labels", "depths"))
            if (
                images.ndim != 4
                or images.shape[1] != 3
                or labels.shape != images.shape[:1] + images.shape[2:]
                or depths.shape != labels.shape
            ):
                raise DataError(
                    f"{self.mat}: images {images.shape}, labels {labels.shape}, depths {depths.shape}: "
                    "expected (N, 3, W, H), (N, W, H), (N, W, H) as h5py reads MATLAB's arrays"
                )
        return self._file

    def list(self) -> list[SampleRef]:
        n = self._open()["images"].shape[0]
        train, test = read_splits(self.splits, n)
        refs = []
        for indices, source_split in ((train, "train"), (test, "test")):
            for i in indices:
                refs.append(SampleRef(f"nyuv2/{i + 1:04d}", source_split, (f"{self.mat.name}#{i + 1}",)))
        return refs

    def load(self, ref: SampleRef) -> Sample:
        f = self._open()
        i = int(ref.sample_id.rsplit("/", 1)[1]) - 1
        where = f"{self.mat}: frame {i + 1}"
        try:
            image = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))
            raw = np.ascontiguousarray(f["labels"][i].T)
            depth = np.ascontiguousarray(f["depths"][i].T, dtype=np.float32)
        except OSError as exc:
            raise DataError(f"{where}: unreadable ({exc})") from None
        if image.dtype != np.uint8:
            raise DataError(f"{where}: images are {image.dtype}; expected uint8")
        if raw.min() < 0 or raw.max() > RAW_CLASSES:
            raise DataError(f"{where}: label id {int(raw.max())} outside 0..{RAW_CLASSES}")
        return Sample(ref.sample_id, image, self.lookup[raw.astype(np.int64)], depth)

    def describe(self) -> dict:
        stat = self.mat.stat()
        mapping = hashlib.sha256(self.class_map.read_bytes()).hexdigest()
        return {
            "root": str(self.mat.resolve()),
            "layout": "official labelled .mat (v7.3) + splits.mat",
            "mat_bytes": stat.st_size,
            "splits": str(self.splits.resolve()),
            "class_map": str(self.class_map.resolve()),
            "class_map_sha256": mapping,
            "classes": len(self.classes),
        }
