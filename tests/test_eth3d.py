"""The ETH3D reader and the synthetic ETH3D generator: depth against the ray-cast truth, intrinsics, windows and
splits, every bad input, determinism."""

from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from lowrank_core.errors import ConfigError, DataError
from lowrank_core.modalities.depth.eth3d import (Eth3dConfig, Scene, View, load_window, prepare_eth3d, read_scene,
                                                 scene_windows, sparse_depth, split_scene)
from lowrank_core.modalities.depth.synthetic import SyntheticScenesSpec, generate_synthetic_eth3d

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_synthetic_eth3d(tmp_path_factory.mktemp("eth3d") / "scenes", SyntheticScenesSpec())


def _copy_scene(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root / "facade_0", tmp_path / "facade_0")).resolve()


def _pixel_brackets(target: int, full: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target pixel, the first and last full-resolution pixel centres around its footprint, and whether both lie
    inside the image."""
    scale = target / full
    first = np.floor(np.arange(target) / scale - 0.5).astype(int)
    last = np.ceil((np.arange(target) + 1) / scale - 0.5).astype(int)
    return np.clip(first, 0, full - 1), np.clip(last, 0, full - 1), (first >= 0) & (last < full)


def test_sparse_depth_matches_the_ray_cast_depth(root):
    """A point anywhere in a target pixel's footprint lies on a surface ray cast (the laser file) at the full-res
    pixel centres around it: its depth lies within their range, up to 0.5% for the change of a surface's depth over
    the less than half a pixel between the last centre and the surface's edge (measured: at most 0.2%). Footprints
    with unknown laser depth (sky, dropout patches) and the outer ring (no centre beyond it) are not compared."""
    size, compared, total = (42, 60), 0, 0
    for scene_dir in sorted(root.iterdir()):
        scene = read_scene(scene_dir)
        window = load_window({"scene_dir": str(scene_dir), "frames": [v.name for v in scene.views]}, size, (0.1, 100.0))
        camera = scene.cameras[1]
        rows_first, rows_last, rows_inner = _pixel_brackets(size[0], camera.height)
        cols_first, cols_last, cols_inner = _pixel_brackets(size[1], camera.width)
        for i, view in enumerate(scene.views):
            laser = np.fromfile(view.laser_path, "<f4").reshape(camera.height, camera.width).astype(np.float64)
            assert ((laser[np.isfinite(laser)] > 2.0) & (laser[np.isfinite(laser)] < 20.0)).all()
            by_col = [np.stack([laser[:, a:b + 1].min(1) for a, b in zip(cols_first, cols_last)], 1),
                      np.stack([laser[:, a:b + 1].max(1) for a, b in zip(cols_first, cols_last)], 1)]
            low = np.stack([by_col[0][a:b + 1].min(0) for a, b in zip(rows_first, rows_last)])
            high = np.stack([by_col[1][a:b + 1].max(0) for a, b in zip(rows_first, rows_last)])
            depth = window["depth"][i].double().numpy()
            valid, eval_valid = window["valid"][i].numpy(), window["eval_valid"][i].numpy()
            assert (valid <= eval_valid).all() and (eval_valid <= (depth > 0)).all() and (eval_valid & ~valid).any()
            compare = (depth > 0) & np.isfinite(high) & rows_inner[:, None] & cols_inner[None]
            assert (depth[compare] >= low[compare] * 0.995).all() and (depth[compare] <= high[compare] * 1.005).all()
            compared, total = compared + compare.sum(), total + (depth > 0).sum()
    assert compared > 0.85 * total


def test_every_point_projects_into_the_images_its_track_names(root):
    for scene_dir in sorted(root.iterdir()):
        model = pycolmap.Reconstruction()
        model.read_text(str(scene_dir / "dslr_calibration_undistorted"))
        for point_id, point in model.points3D.items():
            assert point.track.length() >= 2
            for element in point.track.elements:
                image = model.images[element.image_id]
                camera = model.cameras[image.camera_id]
                xy = camera.img_from_cam(image.cam_from_world() * point.xyz)
                assert 0 <= xy[0] < camera.width and 0 <= xy[1] < camera.height
                observed = image.points2D[element.point2D_idx]
                assert observed.point3D_id == point_id and np.allclose(observed.xy, xy, atol=1e-6)


def test_window_tensors_and_intrinsics_scale_per_axis(root):
    scene = read_scene(root / "facade_0")  # PINHOLE
    camera = scene.cameras[1]
    fx, fy, cx, cy = camera.params
    size = (40, 64)
    window = load_window({"scene_dir": str(scene.directory), "frames": [v.name for v in scene.views[:3]]}, size,
                         (0.1, 100.0))
    assert window["images"].shape == (3, 3, 40, 64) and window["images"].dtype == torch.float32
    assert 0.0 <= window["images"].min() and window["images"].max() <= 1.0
    assert window["laser_valid"].any() and (window["laser"][~window["laser_valid"]] == 0).all()
    sx, sy = 64 / camera.width, 40 / camera.height
    expected = torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)
    assert torch.allclose(window["intrinsics"], expected.expand(3, 3, 3))
    # the scaled intrinsics put each point on a pixel whose (z-buffered) depth is at most the point's
    view, depth = scene.views[0], window["depth"][0].numpy()
    in_camera = scene.points @ view.cam_from_world[:, :3].T + view.cam_from_world[:, 3]
    assert np.allclose(window["extrinsics"][0].numpy(), view.cam_from_world, atol=1e-6)
    uv = in_camera @ window["intrinsics"][0].double().numpy().T
    cols, rows = np.floor(uv[:, :2] / uv[:, 2:]).astype(int).T
    inside = (cols >= 0) & (cols < 64) & (rows >= 0) & (rows < 40)
    assert inside.sum() > 100 and (depth[rows[inside], cols[inside]] <= in_camera[inside, 2] * (1 + 1e-6)).all()


def test_sparse_depth_keeps_the_nearest_point_and_drops_points_out_of_range():
    camera = pycolmap.Camera.create_from_model_name(1, "PINHOLE", 10.0, 20, 10)
    camera.params = [10.0, 10.0, 10.0, 5.0]
    points = np.array([[0.0, 0.0, 4.0], [0.0, 0.0, 2.0], [0.1, 0.0, 50.0], [0.0, 0.0, -3.0], [0.3, 0.0, 1.0]])
    view = View("v.png", 1, 1, np.eye(3, 4), Path("v.png"), None, None)
    depth = sparse_depth(Scene(Path("."), {1: camera}, (view,), points, ((1,),) * 5), view, (5, 10), (1.5, 20.0))
    assert depth[2, 5] == 2.0  # nearer of the two on the axis; 50 m and 1 m are out of range, -3 m is behind
    assert np.count_nonzero(depth) == 1


def test_windows_and_splits_keep_overlapping_windows_on_one_side():
    names = [f"DSC_{i:04d}.png" for i in range(40)]
    assert scene_windows(names[:10], 4, 0.5) == [names[0:4], names[2:6], names[4:8], names[6:10]]
    assert len(scene_windows(names[:10], 4, 0.75)) == 7 and len(scene_windows(names[:10], 4, 0.0)) == 2
    assert scene_windows(names[:3], 4, 0.5) == []
    cfg = Eth3dConfig.from_dict({"frames": 5, "overlap": 0.6})
    splits = split_scene(names, cfg)
    blocks = {split: sorted({n for w in windows for n in w}) for split, windows in splits.items()}
    assert max(blocks["train"]) < min(blocks["val"]) and max(blocks["val"]) < min(blocks["test"])
    assert blocks["train"][-1] < names[28] and blocks["val"][0] >= names[28] and blocks["test"][0] >= names[34]
    for windows in splits.values():
        starts = [names.index(w[0]) for w in windows]
        assert all(w == names[s:s + 5] for s, w in zip(starts, windows))
        assert all(b - a == 2 for a, b in zip(starts, starts[1:]))  # stride round(5 * 0.4)


def test_prepare_builds_records_inside_splits(root):
    manifest = prepare_eth3d(root, Eth3dConfig())
    assert [s["name"] for s in manifest["scenes"]] == ["facade_0", "facade_1", "facade_2"]
    seen: dict[tuple[str, str], str] = {}
    ids = set()
    for split, info in manifest["splits"].items():
        assert info["count"] == len(info["records"]) > 0
        for record in info["records"]:
            assert Path(record["scene_dir"]).is_absolute() and len(record["frames"]) == 4
            assert record["id"] == f"{Path(record['scene_dir']).name}/{record['frames'][0][-8:-4]}"
            ids.add(record["id"])
            for name in record["frames"]:
                assert seen.setdefault((record["scene_dir"], name), split) == split
    assert len(ids) == sum(info["count"] for info in manifest["splits"].values())


def _break(scene: Path, what: str) -> Path:
    """Break one thing in a copy of a scene; the path the error must name."""
    calibration = scene / "dslr_calibration_undistorted"
    if what == "no calibration":
        shutil.rmtree(calibration)
        return calibration
    if what == "no points3D.txt":
        (calibration / "points3D.txt").unlink()
        return calibration / "points3D.txt"
    if what == "corrupt cameras.txt":
        (calibration / "cameras.txt").write_text("1 PINHOLE 96\n")
        return calibration / "cameras.txt"
    if what == "track to image 999":
        lines = (calibration / "points3D.txt").read_text().splitlines()
        lines[3] += " 999 0"
        (calibration / "points3D.txt").write_text("\n".join(lines) + "\n")
        return calibration / "points3D.txt"
    if what == "missing image":
        (path := scene / "images/dslr_images_undistorted/DSC_0005.png").unlink()
        return path
    if what == "truncated laser":
        path = scene / "ground_truth_depth/dslr_images/DSC_0007.png"
        path.write_bytes(path.read_bytes()[:-4])
        return path
    path = scene / "masks_for_images/dslr_images/DSC_0002.png"  # mask of the wrong size
    Image.new("L", (10, 10)).save(path)
    return path


@pytest.mark.parametrize("what", ["no calibration", "no points3D.txt", "corrupt cameras.txt", "track to image 999",
                                  "missing image", "truncated laser", "mask size"])
def test_bad_scene_input_is_a_data_error_naming_the_file(root, tmp_path, what):
    culprit = _break(_copy_scene(root, tmp_path), what)
    with pytest.raises(DataError) as error:
        read_scene(tmp_path / "facade_0")
    assert str(error.value).startswith(f"{culprit}: ")


def test_a_scene_without_valid_depth_is_a_data_error(root, tmp_path):
    scene = _copy_scene(root, tmp_path)
    for path in (scene / "masks_for_images/dslr_images").iterdir():
        Image.new("L", Image.open(path).size, 1).save(path)
    with pytest.raises(DataError, match=f"^{re.escape(str(scene))}: too few valid depth pixels"):
        prepare_eth3d(tmp_path, Eth3dConfig())


def test_config_errors_name_the_key(root):
    with pytest.raises(DataError, match=r"^dataset\.eth3d\.scenes: nowhere"):
        prepare_eth3d(root, Eth3dConfig(scenes=("nowhere",)))
    with pytest.raises(DataError, match="split 'test' has no windows"):
        prepare_eth3d(root, Eth3dConfig(split={"train": 0.9, "val": 0.1, "test": 0.0}))
    for bad, key in [({"overlap": 1.0}, "overlap"), ({"split": {"train": 0.5, "val": 0.5}}, "split"),
                     ({"split": {"train": 0.5, "val": 0.3, "test": 0.3}}, "split"), ({"frames": 0}, "frames"),
                     ({"depth_range": [5.0, 1.0]}, "depth_range"), ({"image_size": [56]}, "image_size")]:
        with pytest.raises(ConfigError, match=rf"^dataset\.eth3d\.{key}: "):
            Eth3dConfig.from_dict(bad)


def test_generation_is_deterministic(tmp_path):
    spec = SyntheticScenesSpec(seed=3, images_per_scene=4, points_per_scene=200)
    first, second = (generate_synthetic_eth3d(tmp_path / name, spec) for name in ("a", "b"))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file()) and len(files) == 3 * 15
    assert all(filecmp.cmp(first / f, second / f, shallow=False) for f in files)
    other = generate_synthetic_eth3d(tmp_path / "c", SyntheticScenesSpec(seed=4, images_per_scene=4,
                                                                         points_per_scene=200))
    assert not filecmp.cmp(first / files[0], other / files[0], shallow=False)
