"""Detection-head pre-training: it learns on separable features, ignores missing masks, reloads, fails cleanly."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lowrank_core.errors import CheckpointError, ConfigError, DataError, LowrankError
from lowrank_core.head import (DetectionHead, HeadConfig, head_losses, load_feature_split, load_head, predict,
                                pretrain_head, save_head)
from lowrank_core.io import save_tensors
from lowrank_core.metrics import classification_metrics

GRID, CELL, WIDTH = 4, 8, 16
IMAGE_SIZE = GRID * CELL
SHIFT = 4.0
FAST = {"hidden": 32, "epochs_warm": 2, "epochs_joint": 10, "lr": 5e-3, "batch_size": 8, "num_examples": 3}

torch.set_num_threads(1)


def write_split(directory, name, n, seed, grid=(GRID, GRID), mask_paths=True, real_only=False):
    """A cached-feature file whose tampered cells carry a shift along one direction; every 4th tampered record
    has no mask. Masks and images are PNGs in `directory`, named in the metadata."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(1234).normal(size=WIDTH)
    direction /= np.linalg.norm(direction)
    grid_h, grid_w = grid
    features = rng.normal(size=(n, grid_h * grid_w, WIDTH)).astype(np.float32)
    labels = np.zeros(n, dtype=np.int64) if real_only else np.arange(n) % 2
    token_masks = np.zeros((n, grid_h, grid_w), dtype=np.float32)
    has_mask = np.ones(n, dtype=np.uint8)
    image_paths, specs = [], []
    for i in range(n):
        pixels = np.zeros((grid_h * CELL, grid_w * CELL), dtype=np.float32)
        if labels[i]:
            height, width = rng.integers(1, 3, size=2)
            top, left = rng.integers(0, grid_h - height + 1), rng.integers(0, grid_w - width + 1)
            pixels[top * CELL:(top + height) * CELL, left * CELL:(left + width) * CELL] = 1.0
        cells = pixels.reshape(grid_h, CELL, grid_w, CELL).mean(axis=(1, 3))
        features[i] += SHIFT * cells.reshape(-1, 1) * direction
        image_path = directory / f"{name}_{i}_image.png"
        Image.fromarray((rng.random((*pixels.shape, 3)) * 255).astype(np.uint8)).save(image_path)
        image_paths.append(str(image_path))
        if not labels[i]:
            specs.append(f"{pixels.shape[0]}x{pixels.shape[1]}")
        elif i % 8 == 7:
            has_mask[i] = 0
            specs.append(None)
        else:
            token_masks[i] = cells
            specs.append(str(directory / f"{name}_{i}_mask.png"))
            Image.fromarray((pixels * 255).astype(np.uint8)).save(specs[-1])
    metadata = {"grid_h": grid_h, "grid_w": grid_w, "image_size": IMAGE_SIZE, "image_paths": image_paths,
                "model": "synthetic", "hidden_size": WIDTH}
    if mask_paths:
        metadata["mask_paths"] = specs
    path = directory / f"{name}.safetensors"
    save_tensors(path, {"features": torch.from_numpy(features), "labels": torch.from_numpy(labels).long(),
                        "token_masks": torch.from_numpy(token_masks), "has_mask": torch.from_numpy(has_mask)},
                 metadata)
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    return {name: write_split(directory, name, n, seed)
            for name, n, seed in (("train", 128, 0), ("val", 32, 1), ("test", 32, 2))}


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("head")
    metrics = pretrain_head(splits["train"], splits["val"], splits["test"], HeadConfig.from_dict(FAST), out_dir)
    return out_dir, metrics


def test_head_learns_to_detect_and_localise(trained):
    _, metrics = trained
    test = metrics["test"]
    assert test["classification"]["roc_auc"] > 0.9
    assert test["classification"]["accuracy"] > 0.8
    pixel = test["pixel"]
    assert pixel["pixel_iou"] > pixel["all_zero"]["pixel_iou"] + 0.3
    assert pixel["pixel_iou_mean"] > pixel["all_zero"]["pixel_iou_mean"]
    assert metrics["pixel_masks"] == "mask_paths"


def test_pretrain_writes_history_checkpoint_examples_and_metrics(trained):
    out_dir, metrics = trained
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "head.json", "head.safetensors", "heatmaps.png", "history.csv", "metrics.json"]
    history = pd.read_csv(out_dir / "history.csv")
    assert list(history.columns) == ["epoch", "phase", "lr", "train_loss", "train_cls_loss", "train_loc_loss",
                                     "val_loss", "val_cls_loss", "val_loc_loss", "val_roc_auc"]
    assert history["epoch"].tolist() == list(range(1, 13))
    assert history["phase"].tolist() == ["warm"] * 2 + ["joint"] * 10
    joint = history[history["phase"] == "joint"]
    best = joint.sort_values(["val_roc_auc", "val_loss"], ascending=[False, True]).iloc[0]
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_val_roc_auc"] == best["val_roc_auc"]
    assert joint["val_loc_loss"].iloc[-1] < history["val_loc_loss"].iloc[0]
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert set(metrics) >= {"val", "test", "head", "parameters", "train_seconds", "config"}
    with Image.open(out_dir / "heatmaps.png") as image:
        assert image.format == "PNG" and image.width == image.height  # num_examples=3 rows of 3 panels


def test_records_without_mask_are_left_out_of_pixel_metrics(trained):
    _, metrics = trained
    missing = sum(1 for i in range(32) if i % 2 and i % 8 == 7)
    assert metrics["test"]["pixel"]["n_skipped"] == missing > 0
    assert metrics["test"]["pixel"]["n_images"] == 32 - missing
    assert metrics["test"]["classification"]["n"] == 32


def test_saved_checkpoint_reproduces_the_reported_test_metrics(trained, splits):
    out_dir, metrics = trained
    head = load_head(out_dir / "head.safetensors")
    test = load_feature_split(splits["test"])
    logits, _ = predict(head, test.features, GRID, GRID, batch_size=7)
    assert classification_metrics(logits.sigmoid(), test.labels) == metrics["test"]["classification"]


def test_save_and_load_give_an_identical_head(tmp_path):
    torch.manual_seed(0)
    head = DetectionHead(WIDTH, hidden=8, dropout=0.2).eval()
    save_head(head, tmp_path / "head.safetensors")
    reloaded = load_head(tmp_path / "head.safetensors")
    assert json.loads((tmp_path / "head.json").read_text()) == {"in_dim": WIDTH, "hidden": 8, "dropout": 0.2}
    tokens = torch.randn(3, 6, WIDTH)
    for original, rebuilt in zip(head(tokens, 2, 3), reloaded(tokens, 2, 3)):
        assert torch.equal(original, rebuilt)


def test_load_head_names_a_missing_or_mismatched_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.safetensors: head checkpoint file does not exist"):
        load_head(tmp_path / "absent.safetensors")
    save_head(DetectionHead(WIDTH, hidden=8), tmp_path / "head.safetensors")
    (tmp_path / "head.json").write_text(json.dumps({"in_dim": WIDTH, "hidden": 4, "dropout": 0.0}))
    with pytest.raises(CheckpointError, match="head.safetensors: does not rebuild a head"):
        load_head(tmp_path / "head.safetensors")


def test_forward_shapes_and_grid_check():
    head = DetectionHead(WIDTH, hidden=8)
    image_logits, map_logits = head(torch.randn(2, 12, WIDTH), 3, 4)
    assert image_logits.shape == (2,) and map_logits.shape == (2, 3, 4)
    with pytest.raises(LowrankError, match="12 tokens do not fill a 4x4 grid"):
        head(torch.randn(2, 12, WIDTH), 4, 4)


def test_batch_without_masks_has_zero_localisation_loss_and_no_gradient_from_it():
    head = DetectionHead(WIDTH, hidden=8)
    image_logits, map_logits = head(torch.randn(4, 16, WIDTH), 4, 4)
    labels = torch.tensor([1, 1, 0, 1])
    classification, localisation = head_losses(image_logits, map_logits, labels, torch.rand(4, 4, 4),
                                               torch.zeros(4, dtype=torch.uint8))
    assert float(localisation) == 0.0 and not localisation.requires_grad
    (classification + localisation).backward()
    assert all(p.grad is None for p in head.localise.parameters())
    assert all(p.grad is not None for p in head.classify.parameters())


@pytest.mark.parametrize("loc_loss", ["bce", "dice", "bce+dice"])
def test_records_without_mask_do_not_change_the_localisation_loss(loc_loss):
    map_logits = torch.randn(3, 4, 4, requires_grad=True)
    token_masks = torch.rand(3, 4, 4)
    has_mask = torch.tensor([1, 0, 1], dtype=torch.uint8)
    _, loss = head_losses(torch.zeros(3), map_logits, torch.ones(3), token_masks, has_mask, loc_loss)
    altered = token_masks.clone()
    altered[1] = 1 - altered[1]
    _, same = head_losses(torch.zeros(3), map_logits, torch.ones(3), altered, has_mask, loc_loss)
    assert loss > 0 and torch.equal(loss, same)
    loss.backward()
    assert map_logits.grad[1].abs().sum() == 0 and map_logits.grad[0].abs().sum() > 0


def test_token_masks_serve_when_metadata_names_no_mask_files(tmp_path):
    paths = {name: write_split(tmp_path, name, 8, seed, mask_paths=False)
             for name, seed in (("train", 0), ("val", 1), ("test", 2))}
    cfg = HeadConfig.from_dict({**FAST, "epochs_warm": 0, "epochs_joint": 1})
    metrics = pretrain_head(paths["train"], paths["val"], paths["test"], cfg, tmp_path / "out")
    assert metrics["pixel_masks"] == "token_masks"
    assert metrics["test"]["pixel"]["n_skipped"] == 1  # the record with has_mask 0


def test_single_class_val_split_selects_by_val_loss(splits, tmp_path):
    val = write_split(tmp_path, "val", 8, 1, real_only=True)
    cfg = HeadConfig.from_dict({**FAST, "epochs_warm": 0, "epochs_joint": 2})
    metrics = pretrain_head(splits["train"], val, splits["test"], cfg, tmp_path / "out")
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert metrics["selected_by"] == "val_loss" and metrics["best_val_roc_auc"] is None
    assert metrics["best_epoch"] == history.loc[history["val_loss"].idxmin(), "epoch"]
    assert metrics["val"]["classification"]["roc_auc"] is None
    assert metrics["test"]["classification"]["roc_auc"] is not None


def test_missing_feature_file_fails_cleanly_without_outputs(splits, tmp_path):
    with pytest.raises(DataError, match="missing.safetensors: feature file does not exist"):
        pretrain_head(splits["train"], tmp_path / "missing.safetensors", splits["test"], HeadConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grid_mismatch_between_splits_names_the_file(splits, tmp_path):
    odd = write_split(tmp_path, "odd", 4, 3, grid=(2, 8))
    with pytest.raises(DataError, match=r"odd.safetensors: token grid 2x8 does not match 4x4 of .*train"):
        pretrain_head(splits["train"], splits["val"], odd, HeadConfig(), tmp_path / "out")


def test_unreadable_or_malformed_feature_files_name_the_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"junk junk junk")
    with pytest.raises(DataError, match="junk.safetensors: unreadable feature file"):
        load_feature_split(tmp_path / "junk.safetensors")
    save_tensors(tmp_path / "short.safetensors", {"features": torch.zeros(2, 16, 4), "labels": torch.zeros(2),
                                                  "token_masks": torch.zeros(2, 4, 4), "has_mask": torch.zeros(3)},
                 {"grid_h": 4, "grid_w": 4, "image_size": 32})
    with pytest.raises(DataError, match=r"short.safetensors: tensor 'has_mask' has shape \(3,\), expected \(2,\)"):
        load_feature_split(tmp_path / "short.safetensors")


@pytest.mark.parametrize("override, message", [
    ({"epochs_joint": 0}, "head.epochs_joint: must be at least 1"),
    ({"loc_loss": "l2"}, "head.loc_loss: 'l2' is not one of"),
    ({"threshold": 1.0}, r"head.threshold: must be in \(0, 1\)"),
    ({"lr": "fast"}, "head.lr: expected float"),
])
def test_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig.from_dict(override)
