"""ETH3D high-res multi-view scenes: reading and checking them, sparse and laser depth, sequence windows and splits.

Scene layout, as ETH3D ships it (``{root}/{scene}/``):

* ``images/dslr_images_undistorted/NAME``: the images, any format PIL reads; COLMAP calls them
  ``dslr_images_undistorted/NAME``.
* ``dslr_calibration_undistorted/{cameras,images,points3D}.txt``: a COLMAP text model, read with pycolmap.
* ``ground_truth_depth/dslr_images/NAME`` (optional): laser depth, raw little-endian float32, row-major, the
  image's HxW, ``inf`` where unknown.
* ``masks_for_images/dslr_images/STEM.png`` (optional): ETH3D's naming, the image's stem with ``.png``
  (``DSC_0286.png`` for ``DSC_0286.JPG``); 0 valid, 1 unfit for alignment, 2 excluded from evaluation.

Where an optional directory exists, every image must have its file there; images must have the size of their
camera in cameras.txt.

Depth is camera z in metres. Frames are resized to `image_size` (H, W). A frame's sparse depth: every 3-D point in
front of its camera and inside `depth_range` (others are dropped, not clamped) is projected with pycolmap's camera
model at the calibration resolution, its pixel coordinates are scaled by (W / width, H / height), the same map as
`scaled_intrinsics`, and the nearest point wins each target pixel. Training pixels have a depth and mask 0;
evaluation pixels have a depth and mask != 2; laser pixels are finite, inside `depth_range` and mask != 2.

Record (one sequence window): ``{"id": "SCENE/START", "scene_dir": absolute path, "frames": [COLMAP image
names]}``, START being the 4-digit index of the window's first frame in the scene's image order (sorted by name).
Manifest: ``{"splits": {split: {"count", "records"}}, "warnings": [...], "scenes": [{"name", "scene_dir",
"images", "laser", "masks", "windows": {split: n}, "dropped_windows"}]}``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pycolmap
import torch
from PIL import Image, UnidentifiedImageError

from ...config import Section, require
from ...errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_DIR = "images"
CALIBRATION_DIR = "dslr_calibration_undistorted"
MODEL_FILES = ("cameras.txt", "images.txt", "points3D.txt")
LASER_DIR = "ground_truth_depth/dslr_images"
MASK_DIR = "masks_for_images/dslr_images"
_ROUND_TRIP_TOLERANCE = 1e-6  # normalised image coordinates


@dataclasses.dataclass(frozen=True)
class Eth3dConfig(Section):
    """Which ETH3D scenes, how they are cut into sequence windows and splits, and the frames' size and depths."""

    key = "dataset.eth3d"
    scenes: tuple[str, ...] = ()
    frames: int = 4
    overlap: float = 0.5
    split: dict[str, float] = dataclasses.field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    image_size: tuple[int, int] = (56, 56)
    depth_range: tuple[float, float] = (0.1, 100.0)
    min_valid_pixels: int = 20

    def check(self, key: str) -> None:
        require(all(self.scenes) and len(set(self.scenes)) == len(self.scenes), key, "scenes",
                "must be distinct, non-empty scene directory names")
        require(self.frames >= 1, key, "frames", "must be at least 1")
        require(0.0 <= self.overlap < 1.0, key, "overlap", "must be in [0, 1)")
        require(set(self.split) == set(SPLITS), key, "split", f"must name exactly {', '.join(SPLITS)}")
        require(all(f >= 0 for f in self.split.values()) and abs(sum(self.split.values()) - 1.0) < 1e-6, key,
                "split", "fractions must be non-negative and sum to 1")
        require(len(self.image_size) == 2 and min(self.image_size) >= 1, key, "image_size",
                "must be [height, width], both at least 1")
        require(len(self.depth_range) == 2 and 0.0 < self.depth_range[0] < self.depth_range[1], key, "depth_range",
                "must be [near, far] metres with 0 < near < far")
        require(self.min_valid_pixels >= 0, key, "min_valid_pixels", "must be at least 0")


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """One image of a scene: its COLMAP name and ids, its pose and its files (None: not provided)."""

    name: str
    image_id: int
    camera_id: int
    cam_from_world: np.ndarray  # [3, 4] float64
    image_path: Path
    laser_path: Path | None
    mask_path: Path | None


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """A checked ETH3D scene: cameras by id, views sorted by name, 3-D points and their tracks (image ids)."""

    directory: Path
    cameras: dict[int, pycolmap.Camera]
    views: tuple[View, ...]
    points: np.ndarray  # [N, 3] float64, world frame
    tracks: tuple[tuple[int, ...], ...]  # per point, the ids of the images that observe it

    def view(self, name: str) -> View:
        """The view COLMAP calls `name` (DataError naming the scene if there is none)."""
        for view in self.views:
            if view.name == name:
                return view
        raise DataError(f"{self.directory}: no image {name} in {CALIBRATION_DIR}/images.txt")


# ---------------------------------------------------------------- reading a scene


def read_scene(scene_dir: str | Path) -> Scene:
    """Read and check the scene in `scene_dir` (cached per process by resolved path).

    DataError, its message starting with the offending path: missing or unreadable calibration file, image listed in
    images.txt but not on disk or of another size than its camera, point track naming an unknown image, laser depth
    file of the wrong byte size, mask of the wrong size, missing laser / mask file where the directory exists.
    """
    return _read_scene(Path(scene_dir).resolve())


@functools.cache
def _read_scene(scene_dir: Path) -> Scene:
    model = _read_model(scene_dir / CALIBRATION_DIR)
    views = tuple(sorted((_view(scene_dir, image, model.cameras[image.camera_id])
                          for image in model.images.values()), key=lambda view: view.name))
    if not views:
        raise DataError(f"{scene_dir / CALIBRATION_DIR / 'images.txt'}: lists no images")
    ids = sorted(model.points3D)
    points = np.array([model.points3D[i].xyz for i in ids]).reshape(-1, 3)
    points.setflags(write=False)
    tracks = tuple(tuple(e.image_id for e in model.points3D[i].track.elements) for i in ids)
    return Scene(scene_dir, {i: copy.copy(camera) for i, camera in model.cameras.items()}, views, points, tracks)


def _read_model(calibration: Path) -> pycolmap.Reconstruction:
    """The COLMAP text model in `calibration`; DataError naming the file that is missing or that pycolmap rejects."""
    if not calibration.is_dir():
        raise DataError(f"{calibration}: calibration directory does not exist")
    for name in MODEL_FILES:
        if not (calibration / name).is_file():
            raise DataError(f"{calibration / name}: COLMAP model file does not exist")
    try:
        return _read_text(calibration)
    except Exception as err:  # pycolmap raises ValueError, IndexError, RuntimeError... on malformed files
        raise DataError(f"{_faulty_file(calibration)}: not a readable COLMAP text model file "
                        f"({str(err).strip()})") from None


def _read_text(folder: Path) -> pycolmap.Reconstruction:
    model = pycolmap.Reconstruction()
    model.read_text(str(folder))
    return model


def _faulty_file(calibration: Path) -> Path:
    """The model file pycolmap fails on: read cameras, then cameras + images, with the later files left empty."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_FILES:
            Path(tmp, name).touch()
        for name in MODEL_FILES[:-1]:
            shutil.copyfile(calibration / name, Path(tmp, name))
            try:
                _read_text(Path(tmp))
            except Exception:  # as in _read_model
                return calibration / name
    return calibration / MODEL_FILES[-1]


def _view(scene_dir: Path, image: pycolmap.Image, camera: pycolmap.Camera) -> View:
    """An image's view, its files checked against its camera's size."""
    file_name = Path(image.name).name
    image_path = scene_dir / IMAGE_DIR / image.name
    where = f"listed in {scene_dir / CALIBRATION_DIR / 'images.txt'}"
    width, height = _pil_size(image_path, f"image {where}")
    if (width, height) != (camera.width, camera.height):
        raise DataError(f"{image_path}: image is {width}x{height} but its camera {image.camera_id} in cameras.txt is "
                        f"{camera.width}x{camera.height}")
    laser_path = _optional(scene_dir / LASER_DIR, file_name, "laser depth")
    if laser_path is not None and laser_path.stat().st_size != 4 * camera.width * camera.height:
        raise DataError(f"{laser_path}: laser depth file has {laser_path.stat().st_size} bytes, expected "
                        f"4 x {camera.height} x {camera.width} float32 for its image")
    mask_path = _optional(scene_dir / MASK_DIR, f"{Path(file_name).stem}.png", "mask")
    if mask_path is not None and (size := _pil_size(mask_path, "mask")) != (camera.width, camera.height):
        raise DataError(f"{mask_path}: mask is {size[0]}x{size[1]}, its image {camera.width}x{camera.height}")
    pose = image.cam_from_world().matrix()
    pose.setflags(write=False)
    return View(image.name, image.image_id, image.camera_id, pose, image_path, laser_path, mask_path)


def _optional(folder: Path, name: str, what: str) -> Path | None:
    """`folder / name`; None if `folder` does not exist, DataError if it does but lacks the file."""
    if not folder.is_dir():
        return None
    if not (folder / name).is_file():
        raise DataError(f"{folder / name}: {what} file is missing (every image needs one when {folder} exists)")
    return folder / name


def _pil_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) of the image file `path`, from its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{path}: {what} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: {what} is unreadable ({err})") from None


# ---------------------------------------------------------------- projection and per-frame targets


def scaled_intrinsics(camera: pycolmap.Camera, size: tuple[int, int]) -> np.ndarray:
    """The camera's 3x3 calibration matrix for its images resized to `size` (H, W): x row times W / width, y row
    times H / height (the linear part only, for models with distortion)."""
    matrix = camera.calibration_matrix()
    matrix[0] *= size[1] / camera.width
    matrix[1] *= size[0] / camera.height
    return matrix


def project(camera: pycolmap.Camera, points: np.ndarray) -> np.ndarray:
    """Pixel coordinates [N, 2] at the calibration resolution of camera-frame `points` [N, 3], by pycolmap's model;
    NaN for points not in front of the camera, or where the model folds over (its pixel does not map back to the
    point's ray, beyond the radius where a distortion model stops being monotonic)."""
    pixels = camera.img_from_cam(points.reshape(-1, 3))
    ahead = np.flatnonzero(np.isfinite(pixels).all(1))
    rays = points[ahead, :2] / points[ahead, 2:]
    folded = np.abs(camera.cam_from_img(pixels[ahead]) - rays).max(1, initial=0.0) > _ROUND_TRIP_TOLERANCE
    pixels[ahead[folded]] = np.nan
    return pixels


def sparse_depth(scene: Scene, view: View, size: tuple[int, int], depth_range: tuple[float, float]) -> np.ndarray:
    """Float32 [H, W] z-depth of the scene's 3-D points z-buffered into `view` at `size` (H, W); 0 where none."""
    height, width = size
    camera = scene.cameras[view.camera_id]
    points = scene.points @ view.cam_from_world[:, :3].T + view.cam_from_world[:, 3]
    points = points[(points[:, 2] >= depth_range[0]) & (points[:, 2] <= depth_range[1])]
    pixels = project(camera, points) * (width / camera.width, height / camera.height)
    with np.errstate(invalid="ignore"):
        inside = (pixels >= 0).all(1) & (pixels < (width, height)).all(1)
    cols, rows = np.floor(pixels[inside]).astype(int).T
    depth = np.full(height * width, np.inf)
    np.minimum.at(depth, rows * width + cols, points[inside, 2])
    return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32).reshape(height, width)


def resized_mask(view: View, size: tuple[int, int]) -> np.ndarray:
    """Uint8 [H, W] ETH3D mask of `view` resized (nearest) to `size`; all 0 when the scene has no masks."""
    if view.mask_path is None:
        return np.zeros(size, dtype=np.uint8)
    with Image.open(view.mask_path) as image:
        values = np.asarray(image.resize(size[::-1], Image.NEAREST))
    return (values[..., 0] if values.ndim == 3 else values).astype(np.uint8)


def depth_targets(scene: Scene, view: View, size: tuple[int, int],
                  depth_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """`depth` (sparse, 0 where none), `valid` (depth and mask 0) and `eval_valid` (depth and mask != 2)."""
    depth, labels = sparse_depth(scene, view, size, depth_range), resized_mask(view, size)
    return {"depth": depth, "valid": (depth > 0) & (labels == 0), "eval_valid": (depth > 0) & (labels != 2)}


def laser_depth(scene: Scene, view: View, size: tuple[int, int],
                depth_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """`laser` float32 [H, W] (nearest resize, 0 where unknown) and `laser_valid`: finite, inside `depth_range`, mask
    != 2; all invalid when the scene has no laser depth."""
    if view.laser_path is None:
        return {"laser": np.zeros(size, dtype=np.float32), "laser_valid": np.zeros(size, dtype=bool)}
    camera = scene.cameras[view.camera_id]
    full = np.fromfile(view.laser_path, dtype="<f4").reshape(camera.height, camera.width)
    laser = np.asarray(Image.fromarray(full.astype(np.float32)).resize(size[::-1], Image.NEAREST))
    with np.errstate(invalid="ignore"):
        valid = (laser >= depth_range[0]) & (laser <= depth_range[1]) & (resized_mask(view, size) != 2)
    return {"laser": np.where(valid, laser, 0.0).astype(np.float32), "laser_valid": valid}


@functools.lru_cache(maxsize=1024)
def _frame(scene_dir: Path, name: str, size: tuple[int, int], depth_range: tuple[float, float]) -> dict:
    """Every array of one frame at `size` (cached: training revisits frames every epoch)."""
    scene = _read_scene(scene_dir)
    view = scene.view(name)
    with Image.open(view.image_path) as image:
        pixels = np.asarray(image.convert("RGB").resize(size[::-1], Image.BICUBIC), dtype=np.float32)
    camera = scene.cameras[view.camera_id]
    return {"images": pixels.transpose(2, 0, 1) / 255.0, **depth_targets(scene, view, size, depth_range),
            **laser_depth(scene, view, size, depth_range),
            "intrinsics": scaled_intrinsics(camera, size).astype(np.float32),
            "extrinsics": view.cam_from_world.astype(np.float32)}


def load_window(record: dict, image_size: tuple[int, int],
                depth_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    """The tensors of one sequence record, S frames at `image_size` (H, W): `images` [S, 3, H, W] float in [0, 1],
    `depth`, `laser` [S, H, W] float (0 where invalid), `valid`, `eval_valid`, `laser_valid` [S, H, W] bool,
    `intrinsics` [S, 3, 3] (scaled), `extrinsics` [S, 3, 4] (cam_from_world)."""
    scene_dir = Path(record["scene_dir"]).resolve()
    frames = [_frame(scene_dir, name, tuple(image_size), tuple(map(float, depth_range))) for name in record["frames"]]
    return {key: torch.from_numpy(np.stack([frame[key] for frame in frames])) for key in frames[0]}


# ---------------------------------------------------------------- windows, splits, manifest


def scene_windows(image_names: list[str], frames: int, overlap: float) -> list[list[str]]:
    """Consecutive windows of `frames` names, in order, every max(1, round(frames * (1 - overlap))) names."""
    stride = max(1, round(frames * (1.0 - overlap)))
    return [list(image_names[start:start + frames]) for start in range(0, len(image_names) - frames + 1, stride)]


def split_scene(image_names: list[str], cfg: Eth3dConfig) -> dict[str, list[list[str]]]:
    """Windows per split: contiguous blocks of the image order by `cfg.split` fractions, windows inside each block
    only (none straddles two splits, no image is in two)."""
    bounds = np.round(np.cumsum([0.0] + [cfg.split[s] for s in SPLITS]) * len(image_names)).astype(int)
    return {split: scene_windows(image_names[bounds[i]:bounds[i + 1]], cfg.frames, cfg.overlap)
            for i, split in enumerate(SPLITS)}


def scene_dirs(root: str | Path, cfg: Eth3dConfig) -> list[Path]:
    """The resolved directories of `cfg.scenes` under `root`, or of every (non-hidden) directory there, sorted.

    DataError for a missing root or one without scenes; `dataset.eth3d.scenes: ...` for a configured scene that is
    not there."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: ETH3D root directory does not exist")
    for name in cfg.scenes:
        if not (root / name).is_dir():
            raise DataError(f"{cfg.key}.scenes: {name} is not a scene directory under {root}")
    names = cfg.scenes or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: holds no scene directories")
    return [root / name for name in names]


def prepare_eth3d(root: str | Path, cfg: Eth3dConfig) -> dict:
    """Read and check every configured scene under `root`, cut its windows into splits, and return the manifest.

    Windows with a frame of fewer than `cfg.min_valid_pixels` training pixels are dropped (a warning); DataError for
    a scene left without windows, for an empty split, and those of `scene_dirs`.
    """
    scenes = scene_dirs(root, cfg)
    manifest = {"splits": {split: {"count": 0, "records": []} for split in SPLITS}, "warnings": [], "scenes": []}
    for scene_dir in scenes:
        manifest["scenes"].append(_add_scene(scene_dir, cfg, manifest))
    for split, info in manifest["splits"].items():
        if not info["records"]:
            raise DataError(f"{scenes[0].parent}: split '{split}' has no windows of {cfg.frames} frames "
                            f"(scenes: {', '.join(d.name for d in scenes)})")
        info["count"] = len(info["records"])
    for warning in manifest["warnings"]:
        log.warning(warning)
    return manifest


def _add_scene(scene_dir: Path, cfg: Eth3dConfig, manifest: dict) -> dict:
    """Add the scene's usable windows to the manifest's splits; its summary."""
    scene = read_scene(scene_dir)
    names = [view.name for view in scene.views]
    usable = {view.name for view in scene.views
              if depth_targets(scene, view, cfg.image_size, cfg.depth_range)["valid"].sum() >= cfg.min_valid_pixels}
    windows = split_scene(names, cfg)
    total = sum(map(len, windows.values()))
    if total == 0:
        raise DataError(f"{scene_dir}: {len(names)} images give no window of {cfg.frames} frames in any split")
    kept = {split: [w for w in windows[split] if usable.issuperset(w)] for split in SPLITS}
    dropped = total - sum(map(len, kept.values()))
    if dropped == total:
        raise DataError(f"{scene_dir}: too few valid depth pixels: every window has a frame with fewer than "
                        f"{cfg.min_valid_pixels} at {cfg.image_size[0]}x{cfg.image_size[1]}")
    if dropped:
        manifest["warnings"].append(f"{scene_dir}: dropped {dropped} of {total} windows with a frame of fewer than "
                                    f"{cfg.min_valid_pixels} valid depth pixels")
    for split in SPLITS:
        manifest["splits"][split]["records"] += [
            {"id": f"{scene_dir.name}/{names.index(w[0]):04d}", "scene_dir": str(scene_dir), "frames": w}
            for w in kept[split]]
    return {"name": scene_dir.name, "scene_dir": str(scene_dir), "images": len(names),
            "laser": scene.views[0].laser_path is not None, "masks": scene.views[0].mask_path is not None,
            "windows": {split: len(kept[split]) for split in SPLITS}, "dropped_windows": dropped}
