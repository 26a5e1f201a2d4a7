"""A deterministic synthetic ETH3D: facade scenes in the ETH3D high-res multi-view layout, rendered by ray casting.

Scene `facade_{i}` is a brick wall with recessed windows and a recessed door, standing on a ground plane under
the sky, seen by `images_per_scene` cameras along a path in front of it. World axes are COLMAP's camera axes at
rest: x right, y down, z towards the wall. Each image is ray cast through its pixel centres (one ray per pixel), so
its depth is exact; shading carries depth cues a model can learn (perspective-shrinking bricks, darker recesses,
Lambertian side walls, haze growing with distance). Scenes cycle through the camera models PINHOLE, SIMPLE_PINHOLE
and SIMPLE_RADIAL (small barrel distortion, rays unprojected with pycolmap's own model).

Files per scene (the layout `eth3d.py` reads):

* ``images/dslr_images_undistorted/DSC_0000.png`` ...
* ``dslr_calibration_undistorted/{cameras,images,points3D}.txt``: the COLMAP text model, written by hand in
  COLMAP's format; one camera shared by all images.
* ``ground_truth_depth/dslr_images/DSC_0000.png``: raw float32 z-depth, ``inf`` on the sky and on one small
  patch per image (a laser dropout).
* ``masks_for_images/dslr_images/DSC_0000.png``: 0 valid, with one small patch of 1 and one of 2.

3-D points are sampled on surfaces seen by some image; a point is kept only if it is unoccluded in every image it
projects into, and seen by at least two, and its track lists exactly those images (with matching POINTS2D). So
sparse depth from all the points needs no occlusion handling to be exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image

from ...config import Section, require
from ...io import atomic_path
from .eth3d import project

CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL")
SKY, GROUND, WALL, GLASS, DOOR, REVEAL = range(6)
_HAZE = np.array([0.75, 0.8, 0.85])
_COLORS = {GLASS: (0.12, 0.16, 0.24), DOOR: (0.36, 0.2, 0.1), GROUND: (0.42, 0.42, 0.4)}


@dataclasses.dataclass(frozen=True)
class SyntheticScenesSpec(Section):
    """Sizes of the synthetic ETH3D scenes."""

    key = "dataset.synthetic_scenes"
    seed: int = 0
    scenes: int = 3
    images_per_scene: int = 40  # with the default 70/15/15 split and 4-frame windows: 2 val and 2 test windows
    width: int = 96
    height: int = 72
    points_per_scene: int = 4000

    def check(self, key: str) -> None:
        require(self.seed >= 0, key, "seed", "must be at least 0")
        require(self.scenes >= 1, key, "scenes", "must be at least 1")
        require(self.images_per_scene >= 2, key, "images_per_scene", "must be at least 2")
        require(self.width >= 16, key, "width", "must be at least 16")
        require(self.height >= 16, key, "height", "must be at least 16")
        require(self.points_per_scene >= 1, key, "points_per_scene", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class Facade:
    """The geometry and materials of one scene (y grows downwards, so `top` < `ground`)."""

    wall_z: float
    ground: float
    top: float
    half_width: float
    recesses: np.ndarray  # [K, 5]: x0, x1, y0, y1 of the opening, depth behind the wall
    kinds: np.ndarray  # [K]: GLASS or DOOR, the material at the back of each recess
    wall_color: np.ndarray  # [3]
    bricks: np.ndarray  # [64, 64] brightness factor per brick (indices taken modulo 64)


@dataclasses.dataclass(frozen=True)
class Hits:
    """Where rays ``origin + t * direction`` first meet the scene (t = inf and kind SKY where they meet nothing)."""

    t: np.ndarray
    kind: np.ndarray
    normal: np.ndarray
    point: np.ndarray


def generate_synthetic_eth3d(out_dir: str | Path, spec: SyntheticScenesSpec) -> Path:
    """Write `spec.scenes` scenes `facade_{i}` into `out_dir`, atomically, deterministically from `spec.seed`."""
    with atomic_path(out_dir) as tmp:
        for i in range(spec.scenes):
            _write_scene(tmp / f"facade_{i}", np.random.default_rng([spec.seed, i]), spec,
                         CAMERA_MODELS[i % len(CAMERA_MODELS)])
    return Path(out_dir)


def make_facade(rng: np.random.Generator) -> Facade:
    """A wall 8-12 m away, 2-3 storeys of windows recessed 0.25-0.45 m, a door recessed 0.5 m."""
    ground = rng.uniform(1.4, 1.8)
    storeys = int(rng.integers(2, 4))
    door_x = rng.uniform(-2.0, 2.0)
    recesses, kinds = [(door_x - 0.8, door_x + 0.8, ground - 2.4, ground, 0.5)], [DOOR]
    spacing, width, height, depth = rng.uniform((2.2, 1.0, 1.3, 0.25), (3.0, 1.4, 1.8, 0.45))
    for storey in range(storeys):
        sill = ground - 3.0 * storey - 0.9
        for x in np.arange(-6, 7) * spacing:
            if storey == 0 and abs(x - door_x) < 0.8 + width / 2 + 0.3:
                continue
            recesses.append((x - width / 2, x + width / 2, sill - height, sill, depth))
            kinds.append(GLASS)
    return Facade(wall_z=rng.uniform(8.0, 12.0), ground=ground, top=ground - 3.0 * storeys - 0.8, half_width=20.0,
                  recesses=np.array(recesses), kinds=np.array(kinds),
                  wall_color=rng.uniform([0.45, 0.2, 0.12], [0.7, 0.4, 0.3]), bricks=rng.uniform(0.75, 1.15, (64, 64)))


@np.errstate(divide="ignore", invalid="ignore")
def cast(facade: Facade, origin: np.ndarray, directions: np.ndarray) -> Hits:
    """First hits of rays from `origin` [3] along `directions` [N, 3] (directions with positive z)."""
    n = len(directions)
    t, kind, normal = np.full(n, np.inf), np.full(n, SKY), np.zeros((n, 3))
    inverse = 1.0 / directions
    t_wall = (facade.wall_z - origin[2]) * inverse[:, 2]
    x, y = (origin[:2] + t_wall[:, None] * directions[:, :2]).T
    wall = (np.abs(x) <= facade.half_width) & (y >= facade.top) & (y <= facade.ground)
    t[wall], kind[wall], normal[wall] = t_wall[wall], WALL, (0.0, 0.0, -1.0)
    for (x0, x1, y0, y1, depth), back in zip(facade.recesses, facade.kinds):
        inside = np.flatnonzero(wall & (x > x0) & (x < x1) & (y > y0) & (y < y1))
        d, rows = directions[inside], np.arange(len(inside))
        exits = np.stack([(np.where(d[:, 0] > 0, x1, x0) - origin[0]) * inverse[inside, 0],
                          (np.where(d[:, 1] > 0, y1, y0) - origin[1]) * inverse[inside, 1],
                          (facade.wall_z + depth - origin[2]) * inverse[inside, 2]], axis=1)
        axis = np.argmin(exits, axis=1)  # the side wall (x, y) or the back (z) the ray leaves the recess by
        t[inside], kind[inside] = exits[rows, axis], np.where(axis == 2, back, REVEAL)
        normal[inside] = 0.0
        normal[inside, axis] = -np.sign(d[rows, axis])
    t_ground = (facade.ground - origin[1]) * inverse[:, 1]
    ground = (directions[:, 1] > 0) & (origin[2] + t_ground * directions[:, 2] < facade.wall_z) & (t_ground < t)
    t[ground], kind[ground], normal[ground] = t_ground[ground], GROUND, (0.0, -1.0, 0.0)
    return Hits(t, kind, normal, origin + np.where(np.isfinite(t), t, 0.0)[:, None] * directions)


def render(facade: Facade, camera: pycolmap.Camera, cam_from_world: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], z-depth float64 [H, W], inf on the sky) of one view, one ray per pixel centre."""
    u, v = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5)
    rotation, translation = cam_from_world[:, :3], cam_from_world[:, 3]
    rays = np.c_[camera.cam_from_img(np.c_[u.ravel(), v.ravel()]), np.ones(u.size)]  # camera z = 1: t is z-depth
    hits = cast(facade, -rotation.T @ translation, rays @ rotation)
    color = _shade(facade, hits, rays @ rotation) + rng.normal(0.0, 0.006, (u.size, 3))
    image = np.round(np.clip(color, 0.0, 1.0) * 255).astype(np.uint8)
    return image.reshape(camera.height, camera.width, 3), hits.t.reshape(camera.height, camera.width)


def _shade(facade: Facade, hits: Hits, directions: np.ndarray) -> np.ndarray:
    """Colour per hit: material x (ambient + Lambert), darker inside recesses, hazier with distance."""
    albedo = np.zeros((len(hits.t), 3))
    for kind, color in _COLORS.items():
        albedo[hits.kind == kind] = color
    wall = hits.kind == WALL
    row = np.floor(hits.point[:, 1] / 0.3).astype(int)
    col = np.floor(hits.point[:, 0] / 0.8 + 0.5 * (row % 2)).astype(int)
    mortar = (np.mod(hits.point[:, 1], 0.3) < 0.04) | (np.mod(hits.point[:, 0] / 0.8 + 0.5 * (row % 2), 1.0) < 0.05)
    brick = np.where(mortar, 1.5, facade.bricks[row % 64, col % 64])
    albedo[wall] = facade.wall_color * brick[wall, None]
    albedo[hits.kind == REVEAL] = facade.wall_color * 1.2
    tiles = (np.floor(hits.point[:, 0]) + np.floor(hits.point[:, 2])) % 2
    albedo[hits.kind == GROUND] *= 0.9 + 0.2 * tiles[hits.kind == GROUND, None]
    light = np.array([-0.4, -0.6, -0.7]) / np.linalg.norm([-0.4, -0.6, -0.7])
    shade = 0.35 + 0.65 * np.clip(hits.normal @ light, 0.0, None)
    shade[np.isin(hits.kind, (GLASS, DOOR, REVEAL))] *= 0.6
    haze = np.exp(-np.where(np.isfinite(hits.t), hits.t, 0.0) / 30.0)[:, None]
    color = albedo * shade[:, None] * haze + _HAZE * (1.0 - haze)
    sky = hits.kind == SKY
    up = -directions[sky, 1] / np.linalg.norm(directions[sky], axis=1)
    color[sky] = np.array([0.55, 0.7, 0.92]) + np.outer(1.0 - np.clip(up * 2, 0, 1), [0.2, 0.12, 0.05])
    return color


def _camera(model: str, rng: np.random.Generator, width: int, height: int) -> pycolmap.Camera:
    """Camera 1 of a scene: focal length about 0.85 x width, principal point near the centre."""
    focal = 0.85 * width * rng.uniform(0.9, 1.1)
    cx, cy = width / 2 + rng.uniform(-2, 2), height / 2 + rng.uniform(-2, 2)
    params = {"PINHOLE": [focal, focal * rng.uniform(0.97, 1.03), cx, cy], "SIMPLE_PINHOLE": [focal, cx, cy],
              "SIMPLE_RADIAL": [focal, cx, cy, -0.04]}[model]
    camera = pycolmap.Camera.create_from_model_name(1, model, focal, width, height)
    camera.params = params
    return camera


def _poses(facade: Facade, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """cam_from_world [3, 4] of cameras 1.4-2.1 m above the ground walking along the wall, each looking at it."""
    poses = []
    for x in np.linspace(-3.5, 3.5, count) + rng.uniform(-0.1, 0.1, count):
        center = np.array([x, rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.5)])
        target = np.array([0.6 * x + rng.uniform(-1, 1), facade.ground - rng.uniform(1.5, 3.5), facade.wall_z])
        forward = (target - center) / np.linalg.norm(target - center)
        right = np.cross([0.0, 1.0, 0.0], forward)
        right /= np.linalg.norm(right)
        rotation = np.stack([right, np.cross(forward, right), forward])
        poses.append(np.c_[rotation, -rotation @ center])
    return poses


def _sample_points(facade: Facade, camera: pycolmap.Camera, poses: list[np.ndarray], rng: np.random.Generator,
                   count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyz [P, 3], seen [P, images] bool, pixels [P, images, 2]) of up to `count` points, each seen by two or more
    images and unoccluded in every image it projects into."""
    views = rng.integers(0, len(poses), 2 * count)
    samples = rng.uniform((0, 0), (camera.width, camera.height), (2 * count, 2))
    candidates = []
    for j, pose in enumerate(poses):
        rays = np.c_[camera.cam_from_img(samples[views == j]), np.ones((views == j).sum())]
        hits = cast(facade, -pose[:, :3].T @ pose[:, 3], rays @ pose[:, :3])
        candidates.append(hits.point[np.isfinite(hits.t)])
    points = rng.permutation(np.concatenate(candidates))
    inside = np.zeros((len(points), len(poses)), dtype=bool)
    visible = np.zeros_like(inside)
    pixels = np.zeros((len(points), len(poses), 2))
    for j, pose in enumerate(poses):
        pixels[:, j] = project(camera, points @ pose[:, :3].T + pose[:, 3])
        inside[:, j] = (pixels[:, j] >= 0).all(1) & (pixels[:, j] < (camera.width, camera.height)).all(1)
        center = -pose[:, :3].T @ pose[:, 3]
        visible[:, j] = np.abs(cast(facade, center, points - center).t - 1.0) < 1e-9
    keep = (inside <= visible).all(1) & ((inside & visible).sum(1) >= 2)
    return points[keep][:count], inside[keep][:count], pixels[keep][:count]


def _write_scene(scene_dir: Path, rng: np.random.Generator, spec: SyntheticScenesSpec, model: str) -> None:
    facade = make_facade(rng)
    camera = _camera(model, rng, spec.width, spec.height)
    poses = _poses(facade, rng, spec.images_per_scene)
    names = [f"DSC_{i:04d}.png" for i in range(spec.images_per_scene)]
    folders = {key: scene_dir / sub for key, sub in (("images", "images/dslr_images_undistorted"),
                                                     ("calibration", "dslr_calibration_undistorted"),
                                                     ("laser", "ground_truth_depth/dslr_images"),
                                                     ("masks", "masks_for_images/dslr_images"))}
    for folder in folders.values():
        folder.mkdir(parents=True)
    colors = []
    for name, pose in zip(names, poses):
        image, depth = render(facade, camera, pose, rng)
        Image.fromarray(image).save(folders["images"] / name)
        colors.append(image)
        depth[_patch(rng, spec.height, spec.width)] = np.inf
        depth.astype("<f4").tofile(folders["laser"] / name)
        mask = np.zeros((spec.height, spec.width), dtype=np.uint8)
        mask[_patch(rng, spec.height, spec.width)] = 1
        mask[_patch(rng, spec.height, spec.width)] = 2
        Image.fromarray(mask).save(folders["masks"] / name)
    points, seen, pixels = _sample_points(facade, camera, poses, rng, spec.points_per_scene)
    _write_model(folders["calibration"], camera, names, poses, points, seen, pixels, colors)


def _patch(rng: np.random.Generator, height: int, width: int) -> tuple[slice, slice]:
    """A random rectangle of about 1/8 x 1/8 of the image."""
    h, w = max(1, height // 8), max(1, width // 8)
    top, left = rng.integers(0, height - h), rng.integers(0, width - w)
    return slice(top, top + h), slice(left, left + w)


def _write_model(folder: Path, camera: pycolmap.Camera, names: list[str], poses: list[np.ndarray],
                 points: np.ndarray, seen: np.ndarray, pixels: np.ndarray, images: list[np.ndarray]) -> None:
    """cameras.txt, images.txt and points3D.txt in COLMAP's text format (numbers at full precision)."""
    params = " ".join(_num(p) for p in camera.params)
    (folder / "cameras.txt").write_text(
        "# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
        f"# Number of cameras: 1\n1 {camera.model_name} {camera.width} {camera.height} {params}\n")
    index = np.cumsum(seen, axis=0) - 1  # the point's POINT2D_IDX in each image that sees it
    lines = ["# Image list with two lines of data per image:",
             "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)",
             f"# Number of images: {len(names)}, mean observations per image: {seen.sum() / len(names)}"]
    for j, (name, pose) in enumerate(zip(names, poses)):
        qx, qy, qz, qw = pycolmap.Rotation3d(pose[:, :3]).quat
        lines.append(" ".join([str(j + 1), *map(_num, (qw, qx, qy, qz, *pose[:, 3])), "1",
                               f"dslr_images_undistorted/{name}"]))
        lines.append(" ".join(f"{_num(u)} {_num(v)} {p + 1}" for p, (u, v) in zip(np.flatnonzero(seen[:, j]),
                                                                                  pixels[seen[:, j], j])))
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
             f"# Number of points: {len(points)}, mean track length: {seen.sum() / max(1, len(points))}"]
    for p, (xyz, row) in enumerate(zip(points, seen)):
        first = np.flatnonzero(row)[0]
        u, v = np.floor(pixels[p, first]).astype(int)
        track = " ".join(f"{j + 1} {index[p, j]}" for j in np.flatnonzero(row))
        lines.append(" ".join([str(p + 1), *map(_num, xyz), *map(str, images[first][v, u]), "0.0", track]))
    (folder / "points3D.txt").write_text("\n".join(lines) + "\n")


def _num(value: float) -> str:
    """A number as text that reads back to the same double."""
    return repr(float(value))
