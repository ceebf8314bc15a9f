"""Procedural street scenes rendered by vectorised ray casting (numpy only).

World frame: X to the right of the street, Y up, Z along the street; the ground is the plane Y = 0.
A pinhole camera stands on the road at height ~1.5 m with a random yaw and pitch. Each scene holds
axis-aligned boxes (buildings, walls, vehicles, signs, hedges), vertical cylinders (poles, trunks,
pedestrians) and spheres (tree crowns, heads). Every pixel's ray is intersected with the ground and with
each object inside that object's projected screen rectangle (a z-buffer), so the cost per object is
proportional to its size on screen, not to the image.

Ground truth is exact: depth is the camera-Z distance of the first hit (the convention of Cityscapes and
NYUv2, not the Euclidean range), labels are the 7 Cityscapes categories. Sky and anything beyond
``max_depth`` have depth 0 (invalid).

A frame depends only on (seed, index, height, width): scenes are sampled in metric units, so two
resolutions of the same index show the same scene.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import numpy as np

from jointdistill.data.sources.categories import CATEGORIES as CLASSES
from jointdistill.data.sources.categories import CATEGORY_PALETTE as PALETTE

FLAT, CONSTRUCTION, OBJECT, NATURE, SKY, HUMAN, VEHICLE = range(7)

# Bump when a change alters the frames a (seed, index) produces: it goes into meta.json and the
# DVC stage's checksum, so old prepared data is never mistaken for new.
GENERATOR_VERSION = 1

BOX, CYLINDER, SPHERE = 0, 1, 2
# Surface hit per pixel.
F_GROUND, F_X, F_Y, F_Z, F_CYLINDER, F_SPHERE = -1, 0, 1, 2, 3, 4
# Surface patterns.
M_PLAIN, M_FACADE, M_PERSON, M_FOLIAGE, M_GLASS = range(5)
_SMALL_RECT = 400  # pixels: objects whose screen rectangle is smaller are cast together
_NEAR = 0.05  # metres: the camera's near plane for screen-rectangle clipping
_BOX_EDGES = np.array([(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)])


@dataclass
class _Scene:
    """Objects as flat arrays (one row per object), ready for vectorised projection and shading."""

    kind: np.ndarray  # (n,) BOX | CYLINDER | SPHERE
    lo: np.ndarray  # (n, 3) bounding box min corner
    hi: np.ndarray  # (n, 3) bounding box max corner
    radius: np.ndarray  # (n,) cylinders and spheres
    label: np.ndarray  # (n,) category id
    material: np.ndarray  # (n,) M_*
    color_a: np.ndarray  # (n, 3) main colour, linear [0, 1]
    color_b: np.ndarray  # (n, 3) secondary colour (windows, trousers)


class _SceneBuilder:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def box(self, lo, hi, label, material, a, b=None):
        self.rows.append((BOX, lo, hi, 0.0, label, material, a, a if b is None else b))

    def cylinder(self, cx, cz, r, y0, y1, label, a, b=None, material=M_PLAIN):
        self.rows.append(
            (CYLINDER, (cx - r, y0, cz - r), (cx + r, y1, cz + r), r, label, material, a, a if b is None else b)
        )

    def sphere(self, c, r, label, a, material=M_PLAIN):
        lo = (c[0] - r, c[1] - r, c[2] - r)
        hi = (c[0] + r, c[1] + r, c[2] + r)
        self.rows.append((SPHERE, lo, hi, r, label, material, a, a))

    def build(self) -> _Scene:
        cols = list(zip(*self.rows)) if self.rows else [()] * 8
        f = np.float32
        return _Scene(
            kind=np.asarray(cols[0], dtype=np.int8),
            lo=np.asarray(cols[1], dtype=f).reshape(-1, 3),
            hi=np.asarray(cols[2], dtype=f).reshape(-1, 3),
            radius=np.asarray(cols[3], dtype=f),
            label=np.asarray(cols[4], dtype=np.uint8),
            material=np.asarray(cols[5], dtype=np.int8),
            color_a=np.asarray(cols[6], dtype=f).reshape(-1, 3),
            color_b=np.asarray(cols[7], dtype=f).reshape(-1, 3),
        )


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc only).

    Rendering makes hundreds of short-lived frame-sized temporaries per frame. With glibc's defaults each
    one is a fresh mmap or a trimmed-and-regrown heap, i.e. page faults on every operation: a large share of
    the generator's time (bench/results/data.md). Raising the top pad and the trim and mmap thresholds keeps a few
    tens of MB of freed memory for reuse. Process-wide, so done once, and skipped when the user has set
    any MALLOC_*_ variable or JOINTDISTILL_NO_MALLOPT=1. Returns whether the setting was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("JOINTDISTILL_NO_MALLOPT"):
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_top_pad, 64 << 20) and libc.mallopt(m_trim_threshold, 128 << 20)
        ok = ok and libc.mallopt(m_mmap_threshold, 16 << 20)
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def _uniform_pool(rng: np.random.Generator, block: int = 2048):
    """An endless stream of U[0, 1) draws, taken from ``rng`` a block at a time."""
    while True:
        yield from rng.random(block).tolist()


def _value_noise(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A tileable multi-octave noise texture in [0, 1] (used for asphalt, foliage, clouds...)."""
    out = np.zeros((size, size), np.float32)
    total = 0.0
    for cells, amp in ((4, 1.0), (16, 0.5), (64, 0.3), (256, 0.2)):
        grid = rng.random((cells, cells), dtype=np.float32)
        x = np.arange(size, dtype=np.float32) * cells / size
        i0 = np.floor(x).astype(np.int64)
        fr = (x - i0)[None, :]
        i1 = (i0 + 1) % cells
        rows = grid[:, i0] * (1 - fr) + grid[:, i1] * fr  # (cells, size)
        frc = fr.T
        out += amp * (rows[i0, :] * (1 - frc) + rows[i1, :] * frc)
        total += amp
    out /= total
    out -= out.min()
    out /= out.max()
    return out


# ------------------------------------------------------------------ scene parts (a scene is drawn in this order)
def _buildings(b: _SceneBuilder, u, pool, grey, road: float, walk: float) -> float:
    """Buildings on both sides, with gaps, setbacks and an optional building closing the street at the
    returned distance (inf: none)."""
    end = u(45, 150) if next(pool) < 0.75 else np.inf
    for side in (-1, 1):
        z = u(-25, -5)
        while z < min(end, 160):
            length = u(6, 22)
            if next(pool) < 0.2:  # a gap: the terrain and whatever stands behind show through
                z += length * 0.6
                continue
            face = road + walk + (u(0, 4) if next(pool) < 0.5 else 0.0)
            x0, x1 = (face, face + u(8, 15)) if side > 0 else (-face - u(8, 15), -face)
            wall = (u(0.35, 0.8), u(0.3, 0.7), u(0.25, 0.6))
            window = (u(0.05, 0.2), u(0.08, 0.22), u(0.1, 0.3))
            b.box((x0, 0.0, z), (x1, u(6, 32), z + length), CONSTRUCTION, M_FACADE, wall, window)
            if face > road + walk + 0.5 and next(pool) < 0.5:  # a low wall or hedge before the setback
                xf = side * (road + walk + 0.1)
                if next(pool) < 0.5:
                    b.box(
                        (xf - 0.15, 0, z),
                        (xf + 0.15, u(0.8, 1.8), z + length),
                        CONSTRUCTION,
                        M_PLAIN,
                        grey(0.4, 0.7),
                    )
                else:
                    b.box(
                        (xf - 0.4, 0, z),
                        (xf + 0.4, u(0.8, 1.6), z + length),
                        NATURE,
                        M_FOLIAGE,
                        (u(0.1, 0.2), u(0.3, 0.45), u(0.05, 0.12)),
                    )
            z += length
    if np.isfinite(end):
        wall = (u(0.35, 0.8), u(0.3, 0.7), u(0.25, 0.6))
        b.box((-80, 0, end), (80, u(10, 40), end + 10), CONSTRUCTION, M_FACADE, wall, (0.1, 0.12, 0.18))
    return end


def _poles(b: _SceneBuilder, u, pool, grey, road: float) -> None:
    """Poles with signs and traffic lights along both kerbs."""
    for side in (-1, 1):
        z = u(2, 15)
        while z < 90:
            x = side * (road + u(0.3, 0.6))
            top = u(3.0, 7.0)
            b.cylinder(x, z, u(0.05, 0.1), 0.0, top, OBJECT, grey(0.3, 0.6))
            r = next(pool)
            if r < 0.35:  # a sign plate
                c = [(0.75, 0.1, 0.1), (0.1, 0.25, 0.7), (0.85, 0.7, 0.1)][int(3 * next(pool))]
                y = u(2.0, top - 0.3)
                b.box((x - 0.35, y, z - 0.04), (x + 0.35, y + 0.6, z + 0.04), OBJECT, M_PLAIN, c)
            elif r < 0.55:  # a traffic light
                y = top - 1.0
                b.box((x - 0.18, y, z - 0.2), (x + 0.18, y + 0.9, z + 0.1), OBJECT, M_PLAIN, (0.08, 0.08, 0.06))
            z += u(10, 28)


def _trees(b: _SceneBuilder, u, pool, road: float, walk: float) -> None:
    """Trees between kerb and façades, on both sides."""
    for side in (-1, 1):
        z = u(0, 12)
        while z < 110:
            if next(pool) < 0.7:
                x = side * (road + walk * u(0.55, 0.9))
                h = u(1.8, 3.2)
                r = u(1.0, 2.8)
                b.cylinder(x, z, u(0.1, 0.2), 0.0, h + r * 0.5, NATURE, (0.25, 0.17, 0.1))
                b.sphere((x, h + r * 0.8, z), r, NATURE, (u(0.08, 0.2), u(0.25, 0.45), u(0.04, 0.12)), M_FOLIAGE)
            z += u(7, 20)


def _vehicles(b: _SceneBuilder, u, pool, rng: np.random.Generator, road: float, cam: dict) -> None:
    """Vehicles: moving in lanes and parked along the kerbs."""
    for _ in range(rng.poisson(5) + 1):
        kind = next(pool)
        w, length, h = (1.8, 4.4, 1.5) if kind < 0.7 else (2.0, 5.2, 2.3) if kind < 0.9 else (2.5, 11.0, 3.2)
        w, length, h = w * u(0.92, 1.08), length * u(0.9, 1.1), h * u(0.92, 1.08)
        if next(pool) < 0.4:
            x = (1 if next(pool) < 0.5 else -1) * (road - w / 2 - 0.2)
        else:
            x = u(-road + w / 2 + 0.3, road - w / 2 - 0.3)
        if abs(x - cam["x"]) < w / 2 + 0.8:  # keep clear of the camera's own lane near the camera
            z = u(8, 75)
        else:
            z = u(3, 75)
        body = (u(0.05, 0.9), u(0.05, 0.9), u(0.05, 0.9))
        b.box((x - w / 2, 0.2, z), (x + w / 2, h * 0.6, z + length), VEHICLE, M_PLAIN, body)
        if kind < 0.7:  # cars: a glazed cabin set back on the body
            b.box(
                (x - w * 0.45, h * 0.6, z + length * 0.25),
                (x + w * 0.45, h, z + length * 0.8),
                VEHICLE,
                M_GLASS,
                body,
                (0.05, 0.07, 0.1),
            )
        else:
            b.box((x - w / 2, h * 0.6, z), (x + w / 2, h, z + length), VEHICLE, M_GLASS, body, (0.05, 0.07, 0.1))


def _pedestrians(b: _SceneBuilder, u, pool, rng: np.random.Generator, road: float, walk: float, cam: dict) -> None:
    """Pedestrians on the pavements, some crossing the road."""
    for _ in range(rng.poisson(6)):
        if next(pool) < 0.75:
            x = (1 if next(pool) < 0.5 else -1) * (road + u(0.3, walk - 0.3))
        else:
            x = u(-road, road)
        z = u(2.5, 55)
        if abs(x - cam["x"]) < 0.8 and z < 4:
            continue
        h = u(1.5, 1.95)
        shirt = (u(0.05, 0.9), u(0.05, 0.9), u(0.05, 0.9))
        trousers = (u(0.05, 0.4), u(0.05, 0.4), u(0.05, 0.5))
        b.cylinder(x, z, u(0.18, 0.26), 0.0, h * 0.86, HUMAN, shirt, trousers, M_PERSON)
        b.sphere((x, h * 0.93, z), h * 0.07, HUMAN, (u(0.45, 0.85), u(0.3, 0.6), u(0.2, 0.45)))


class SyntheticScenes:
    """Renders frame ``index`` of the synthetic street-scene dataset at ``height`` × ``width``.

    >>> image, label, depth = SyntheticScenes(128, 256, seed=0).render(3)
    """

    classes = CLASSES
    palette = PALETTE

    def __init__(
        self,
        height: int,
        width: int,
        seed: int = 0,
        hfov_deg: float = 72.0,
        max_depth: float = 100.0,
        tune_memory: bool = True,
    ):
        if height < 8 or width < 8:
            raise ValueError(f"synthetic frames need at least 8×8 pixels, got {height}×{width}")
        if tune_memory:
            tune_allocator()
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        self.max_depth = float(max_depth)
        self.focal = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
        v, u = np.mgrid[0:height, 0:width].astype(np.float32)
        self._xc = (u + 0.5 - width / 2) / self.focal  # camera-frame ray directions with z = 1
        self._yc = -(v + 0.5 - height / 2) / self.focal
        noise_rng = np.random.default_rng([seed, 0x7E47])
        self._texture = _value_noise(noise_rng)
        self._texture_flat = self._texture.ravel()
        # Sensor noise: every frame adds a window of this field at a random offset, which costs one slice
        # instead of drawing H×W×3 normals per frame.
        self._noise = noise_rng.standard_normal((3, 2 * height, 2 * width), dtype=np.float32)

    # ------------------------------------------------------------------ scene sampling
    def _sample_scene(self, rng: np.random.Generator):
        # Uniform draws come from pre-drawn blocks: a numpy call per draw would cost more than the rest of
        # scene sampling together. A scene uses under ~900 draws; a further block is drawn if ever needed.
        pool = _uniform_pool(rng)

        def u(lo, hi):
            return lo + (hi - lo) * next(pool)

        cam = {
            "x": u(-1.5, 1.5),
            "y": u(1.2, 1.8),
            "yaw": np.radians(u(-14, 14)),
            "pitch": np.radians(u(-5, 2)),
        }
        road = u(3.5, 7.0)  # half width of the carriageway
        walk = u(1.5, 4.0)
        street = {"road": road, "walk": walk, "cx": 0.0}
        b = _SceneBuilder()

        def grey(lo, hi):
            g = u(lo, hi)
            return (g, g * u(0.95, 1.05), g * u(0.9, 1.1))

        # The parts of a scene, in a fixed order: each draws from the same stream, so the order is the scene.
        end = _buildings(b, u, pool, grey, road, walk)
        _poles(b, u, pool, grey, road)
        _trees(b, u, pool, road, walk)
        _vehicles(b, u, pool, rng, road, cam)
        _pedestrians(b, u, pool, rng, road, walk, cam)

        light = {
            "sun": tuple(float(c) for c in _unit((u(-0.6, 0.6), u(0.35, 0.9), u(-0.8, 0.6)))),
            "sun_rgb": np.array((1.0, u(0.9, 1.0), u(0.75, 0.95)), np.float32) * u(0.6, 1.0),
            "sky_rgb": np.array((u(0.35, 0.55), u(0.5, 0.7), u(0.75, 0.95)), np.float32),
            "fog": u(90, 400),
            "exposure": u(0.75, 1.3),
            "white": np.array((u(0.92, 1.08), 1.0, u(0.92, 1.08)), np.float32),
            "noise": u(0.004, 0.03),
            "noise_offset": (int(self.height * next(pool)), int(self.width * next(pool))),
        }
        ground = {
            "road": grey(0.22, 0.4),
            "walk": grey(0.5, 0.68),
            "terrain": (u(0.18, 0.35), u(0.3, 0.45), u(0.1, 0.2)),
        }
        if np.isfinite(end):  # everything wholly behind the closing building is hidden by it
            b.rows = [r for r in b.rows if r[1][2] <= end]
        return cam, street, b.build(), light, ground

    # ------------------------------------------------------------------ rendering
    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(image uint8 H×W×3, label uint8 H×W, depth float32 H×W metres, 0 = invalid)``."""
        rng = np.random.default_rng([self.seed, int(index)])
        cam, street, scene, light, ground = self._sample_scene(rng)
        H, W = self.height, self.width

        # Camera rotation: yaw about Y, then pitch about the camera's X axis. Columns = camera axes in world.
        cy, sy = np.cos(cam["yaw"]), np.sin(cam["yaw"])
        cp, sp = np.cos(cam["pitch"]), np.sin(cam["pitch"])
        rot = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        rot = rot.astype(np.float32)
        origin = np.array([cam["x"], cam["y"], 0.0], np.float32)
        xc, yc = self._xc, self._yc
        dx = rot[0, 0] * xc + rot[0, 1] * yc + rot[0, 2]
        dy = rot[1, 0] * xc + rot[1, 1] * yc + rot[1, 2]
        dz = rot[2, 0] * xc + rot[2, 1] * yc + rot[2, 2]
        # t along these unnormalised rays is the camera-Z depth of the hit.
        with np.errstate(divide="ignore"):
            ix, iy, iz = 1.0 / dx, 1.0 / dy, 1.0 / dz

        with np.errstate(divide="ignore", invalid="ignore"):
            tbuf = np.where(dy < 0, -origin[1] * iy, np.inf).astype(np.float32)
        ibuf = np.full((H, W), -1, np.int32)  # -1 ground or sky, else object index
        # Which surface was hit: box faces by axis (the normal is then -sign(ray) along it), or round.
        fbuf = np.full((H, W), F_GROUND, np.int8)

        rects = self._screen_rects(scene, origin, rot)
        ox, oy, oz = (float(v) for v in origin)
        errstate = np.errstate(invalid="ignore", over="ignore", divide="ignore")
        errstate.__enter__()
        try:
            self._cast_objects(scene, rects, (ox, oy, oz), (dx, dy, dz), (ix, iy, iz), tbuf, ibuf, fbuf)
        finally:
            errstate.__exit__(None, None, None)
        return self._shade(scene, street, light, ground, origin, dx, dy, dz, tbuf, ibuf, fbuf)

    @staticmethod
    def _cast_objects(scene, rects, o, d, inv, tbuf, ibuf, fbuf):
        """Z-buffer every visible object: large ones one by one over their rectangle, small ones (most of
        a scene: distant poles, people, trees) all at once, so Python's per-object cost stays bounded."""
        ox, oy, oz = o
        dx, dy, dz = d
        ix, iy, iz = inv
        visible = rects[:, 0] >= 0
        area = (rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])
        small = visible & (area <= _SMALL_RECT)
        if small.any():
            _cast_small(scene, rects, np.flatnonzero(small), area, o, d, inv, tbuf, ibuf, fbuf)
        for k in np.flatnonzero(visible & ~small).tolist():
            r0, r1, c0, c1 = rects[k].tolist()
            sl = (slice(r0, r1), slice(c0, c1))
            kind = scene.kind[k]
            lo, hi = scene.lo[k].tolist(), scene.hi[k].tolist()
            if kind == BOX:
                t, face = _hit_box(ix[sl], iy[sl], iz[sl], ox, oy, oz, lo, hi)
            elif kind == CYLINDER:
                cxk, czk = (lo[0] + hi[0]) / 2, (lo[2] + hi[2]) / 2
                t = _hit_cylinder(dx[sl], dy[sl], dz[sl], ox - cxk, oy, oz - czk, float(scene.radius[k]), lo[1], hi[1])
                face = F_CYLINDER
            else:
                c = [(a + b) / 2 for a, b in zip(lo, hi)]
                t = _hit_sphere(dx[sl], dy[sl], dz[sl], ox - c[0], oy - c[1], oz - c[2], float(scene.radius[k]))
                face = F_SPHERE
            zb = tbuf[sl]
            closer = t < zb
            np.copyto(zb, t, where=closer)
            np.copyto(ibuf[sl], k, where=closer)
            np.copyto(fbuf[sl], face, where=closer)

    def _screen_rects(self, scene: _Scene, origin: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """Pixel rectangles [r0, r1) × [c0, c1) that hold each object's projection; r0 = -1 when unseen.

        Boxes that cross the near plane are clipped against it (their edges' crossing points are added),
        so the objects beside the camera get a tight rectangle instead of the whole image.
        """
        n = len(scene.kind)
        H, W = self.height, self.width
        out = np.full((n, 4), -1, np.int64)
        if n == 0:
            return out
        sel = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]])
        corners = np.where(sel[None], scene.hi[:, None, :], scene.lo[:, None, :])  # (n, 8, 3)
        cam = (corners - origin) @ rot  # camera coordinates
        a, b = cam[:, _BOX_EDGES[:, 0]], cam[:, _BOX_EDGES[:, 1]]  # (n, 12, 3)
        za, zb = a[..., 2], b[..., 2]
        crosses = (za - _NEAR) * (zb - _NEAR) < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(crosses, (_NEAR - za) / (zb - za), 0.0)
        cuts = a + s[..., None] * (b - a)
        pts = np.concatenate([cam, cuts], axis=1)  # (n, 20, 3)
        valid = np.concatenate([cam[..., 2] >= _NEAR, crosses], axis=1)
        z = np.where(valid, pts[..., 2], 1.0)
        u = self.focal * pts[..., 0] / z + W / 2
        v = -self.focal * pts[..., 1] / z + H / 2
        big = 1e9
        umin = np.where(valid, u, big).min(1)
        umax = np.where(valid, u, -big).max(1)
        vmin = np.where(valid, v, big).min(1)
        vmax = np.where(valid, v, -big).max(1)
        far = np.where(valid, pts[..., 2], big).min(1) > self.max_depth * 1.5
        c0 = np.clip(np.floor(umin) - 1, 0, W).astype(np.int64)
        c1 = np.clip(np.ceil(umax) + 2, 0, W).astype(np.int64)
        r0 = np.clip(np.floor(vmin) - 1, 0, H).astype(np.int64)
        r1 = np.clip(np.ceil(vmax) + 2, 0, H).astype(np.int64)
        seen = valid.any(1) & (c1 > c0) & (r1 > r0) & ~far
        out[seen] = np.stack([r0, r1, c0, c1], 1)[seen]
        return out

    def _shade(self, scene, street, light, ground, origin, dx, dy, dz, tbuf, ibuf, fbuf):
        """Turn the z-buffer into image, labels and depth.

        Colour work is planar (3, H, W): numpy broadcasts over a leading axis of 3 far faster than over a
        trailing one, and this function decides the generator's speed.
        """
        H, W = self.height, self.width
        n = len(scene.kind)
        sky = ~np.isfinite(tbuf)
        t = np.where(sky, np.float32(0), tbuf)
        px, py, pz = origin[0] + t * dx, origin[1] + t * dy, origin[2] + t * dz
        obj = ibuf >= 0
        k = np.maximum(ibuf, 0)

        # Ground zones by distance from the street's centre line.
        ax = np.abs(px - street["cx"])
        on_road = ax < street["road"]
        on_walk = ~on_road & (ax < street["road"] + street["walk"])

        label_table = np.concatenate([scene.label, np.array([FLAT, NATURE, SKY], np.uint8)])
        lk = np.where(obj, k, np.where(on_road | on_walk, n, n + 1))
        lk[sky] = n + 2
        label = label_table.take(lk)

        # Normals: a box face's normal points against the ray along the face's axis; round surfaces need
        # the hit point relative to the axis or centre, computed only where they were hit.
        nx = np.where(fbuf == F_X, -np.sign(dx), np.float32(0))
        ny = np.where(fbuf == F_Y, -np.sign(dy), np.float32(0))
        ny[fbuf == F_GROUND] = 1
        nz = np.where(fbuf == F_Z, -np.sign(dz), np.float32(0))
        round_ = np.flatnonzero(fbuf >= F_CYLINDER)
        if round_.size:
            kr = ibuf.ravel()[round_]
            inv_r = 1.0 / scene.radius.take(kr)
            centre = (scene.lo + scene.hi) * 0.5
            nx.ravel()[round_] = (px.ravel()[round_] - centre[:, 0].take(kr)) * inv_r
            nz.ravel()[round_] = (pz.ravel()[round_] - centre[:, 2].take(kr)) * inv_r
            sph = fbuf.ravel()[round_] == F_SPHERE
            ks = kr[sph]
            ny.ravel()[round_[sph]] = (py.ravel()[round_[sph]] - centre[:, 1].take(ks)) * inv_r[sph]
        upright = ny > 0.7

        # Texture: ground and tops use (x, z); vertical surfaces use (x + z, y).
        tu = np.where(upright, px, px + pz)
        tv = np.where(upright, pz, py)
        ti = ((tu * 9).astype(np.int32) & 255) << 8
        ti |= (tv * 9).astype(np.int32) & 255
        fine = self._texture_flat.take(ti)

        # Albedo: one index per pixel into a colour table, then one gather per channel.
        colors = np.concatenate(
            [
                scene.color_a,
                scene.color_b,
                np.array([ground["road"], ground["walk"], ground["terrain"], (0.85, 0.85, 0.85)], np.float32),
            ]
        ).astype(np.float32)
        road_i, walk_i, terrain_i, paint_i = 2 * n, 2 * n + 1, 2 * n + 2, 2 * n + 3
        ci = np.where(on_road, road_i, np.where(on_walk, walk_i, terrain_i))
        # Dashed centre line and solid edge lines; tiles on the pavement.
        lane = on_road & (np.abs(px - street["cx"]) < 0.08) & (((pz * (1 / 4.5)).astype(np.int32) & 1) == 0)
        kerb = on_road & (np.abs(ax - street["road"] + 0.35) < 0.07)
        ci[lane | kerb] = paint_i
        detail = 0.75 + 0.35 * fine
        tiles = on_walk & ((_frac(px * (1 / 0.6)) < 0.07) | (_frac(pz * (1 / 0.6)) < 0.07))
        detail[tiles] *= 0.7
        if n:
            mat = np.where(obj, scene.material.take(k), -1)
            facade = (mat == M_FACADE) & ~upright & (py > 3.0)
            fu = np.where(np.abs(nx) > 0.5, pz, px)
            windows = facade & (_frac(fu * (1 / 3.2)) > 0.28) & (_frac(py * (1 / 3.1)) > 0.32)
            lower = (mat == M_PERSON) & (py < 0.5 * scene.hi[:, 1].take(k))
            glass = (mat == M_GLASS) & (np.abs(ny) < 0.5)
            ci = np.where(obj, np.where(windows | lower | glass, k + n, k), ci)
            detail = np.where(mat == M_FOLIAGE, 0.45 + 1.1 * fine, detail)
        albedo = colors.T.take(ci, axis=1)  # (3, H, W)

        # Lighting: sun (Lambert) plus a sky hemisphere term, attenuated by haze with distance.
        sun = light["sun"]
        fog = np.exp(-t * (1.0 / light["fog"]))
        lam = np.clip(nx * sun[0] + ny * sun[1] + nz * sun[2], 0.0, 1.0) * (detail * fog)
        hemi = (0.2475 + 0.2025 * ny) * (detail * fog)
        haze = 1 - fog
        sun_rgb, sky_rgb = light["sun_rgb"], light["sky_rgb"]
        horizon = np.clip(sky_rgb * 1.25, 0, 1).astype(np.float32)
        rgb = np.empty((3, H, W), np.float32)
        for c in range(3):
            rgb[c] = albedo[c] * (lam * sun_rgb[c] + hemi * sky_rgb[c]) + haze * horizon[c]

        # Sky: gradient from the horizon colour, with clouds.
        rows = np.flatnonzero(sky.any(axis=1))
        if rows.size:
            r0, r1 = rows[0], rows[-1] + 1
            s = sky[r0:r1]
            ddx, ddy, ddz = dx[r0:r1], dy[r0:r1], dz[r0:r1]
            elev = np.clip(ddy / np.sqrt(ddx * ddx + ddy * ddy + ddz * ddz), 0, 1)
            inv = 1.0 / np.maximum(ddy, 1e-3)
            clouds = self._texture[(ddx * inv * 40).astype(np.int32) & 255, (ddz * inv * 40).astype(np.int32) & 255]
            cl = np.clip(clouds - 0.45, 0, 1) * 0.9
            for c in range(3):
                np.copyto(rgb[c, r0:r1], horizon[c] + elev * (sky_rgb[c] - horizon[c]) + cl, where=s)

        # Camera: exposure, white balance, sensor noise (a random window of a fixed noise field), gamma.
        gain = light["exposure"] * light["white"]
        oy_, ox_ = light["noise_offset"]
        noise = self._noise[:, oy_ : oy_ + H, ox_ : ox_ + W]
        for c in range(3):
            rgb[c] *= gain[c]
            rgb[c] += noise[c] * np.float32(light["noise"])
        np.clip(rgb, 0.0, 1.0, out=rgb)
        np.sqrt(rgb, out=rgb)
        rgb *= 255
        rgb += 0.5
        image = np.ascontiguousarray(rgb.astype(np.uint8).transpose(1, 2, 0))

        depth = np.where(sky | (t > self.max_depth), np.float32(0), t)
        return image, label, depth


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _cast_small(scene, rects, ks, area, o, d, inv, tbuf, ibuf, fbuf):
    """Cast the rays of many small rectangles in one vectorised pass; each (object, pixel) pair is one
    element, and the z-buffer is resolved with a scatter-min."""
    W = tbuf.shape[1]
    sizes = area[ks]
    obj = np.repeat(ks, sizes)
    off = np.arange(obj.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width = np.repeat(rects[ks, 3] - rects[ks, 2], sizes)
    pix = (np.repeat(rects[ks, 0], sizes) + off // width) * W + np.repeat(rects[ks, 2], sizes) + off % width
    kind = scene.kind[obj]
    t = np.full(obj.size, np.inf, np.float32)
    face = np.empty(obj.size, np.int8)
    ox, oy, oz = o
    for which in (BOX, CYLINDER, SPHERE):
        sel = np.flatnonzero(kind == which)
        if not sel.size:
            continue
        p, k = pix[sel], obj[sel]
        lo, hi = scene.lo[k].T, scene.hi[k].T
        if which == BOX:
            t[sel], face[sel] = _hit_box(inv[0].ravel()[p], inv[1].ravel()[p], inv[2].ravel()[p], ox, oy, oz, lo, hi)
            continue
        c = (lo + hi) * 0.5
        dxs, dys, dzs = d[0].ravel()[p], d[1].ravel()[p], d[2].ravel()[p]
        if which == CYLINDER:
            t[sel] = _hit_cylinder(dxs, dys, dzs, ox - c[0], oy, oz - c[2], scene.radius[k], lo[1], hi[1])
            face[sel] = F_CYLINDER
        else:
            t[sel] = _hit_sphere(dxs, dys, dzs, ox - c[0], oy - c[1], oz - c[2], scene.radius[k])
            face[sel] = F_SPHERE
    tb = tbuf.ravel()
    np.minimum.at(tb, pix, t)
    win = np.flatnonzero(t == tb[pix])
    ibuf.ravel()[pix[win]] = obj[win]
    fbuf.ravel()[pix[win]] = face[win]


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _hit_box(ix, iy, iz, ox, oy, oz, lo, hi):
    """Slab test; the camera is never inside a box, so the entry distance is the hit, and the slab that
    sets it is the face hit."""
    t1, t2 = (lo[0] - ox) * ix, (hi[0] - ox) * ix
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    t1, t2 = (lo[1] - oy) * iy, (hi[1] - oy) * iy
    ty = np.minimum(t1, t2)
    face = (ty > tn).astype(np.int8)  # F_X = 0, F_Y = 1
    tn, tf = np.maximum(tn, ty), np.minimum(tf, np.maximum(t1, t2))
    t1, t2 = (lo[2] - oz) * iz, (hi[2] - oz) * iz
    tz = np.minimum(t1, t2)
    face[tz > tn] = F_Z
    tn, tf = np.maximum(tn, tz), np.minimum(tf, np.maximum(t1, t2))
    return np.where((tn <= tf) & (tn > 0), tn, np.inf), face


def _hit_cylinder(dx, dy, dz, ex, oy, ez, r, y0, y1):
    """A vertical cylinder's side wall; (ex, ez) is the camera relative to the axis."""
    a = dx * dx + dz * dz
    b = ex * dx + ez * dz
    c = ex * ex + ez * ez - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(disc)) / a
    y = oy + t * dy
    return np.where((disc >= 0) & (t > 0) & (y >= y0) & (y <= y1), t, np.inf)


def _hit_sphere(dx, dy, dz, ex, ey, ez, r):
    a = dx * dx + dy * dy + dz * dz
    b = ex * dx + ey * dy + ez * dz
    c = ex * ex + ey * ey + ez * ez - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)
