"""Detection-head pre-training on cached vision features (the forgery pipelines' `best_by_AUROC_joint`).

`DetectionHead` turns vision tokens [B, T, C] into an image-level tampered/real logit [B] and a token-grid
heat-map logit [B, grid_h, grid_w]; the LoRA stage reuses it on live vision-encoder output. `pretrain_head`
trains it on the `extract_features` cache: a warm phase on classification only, then a joint phase that adds a
localisation loss on the token masks (records without a mask count for classification only). It keeps the head
with the best joint-phase val ROC-AUC (ties: the lower val loss) and reports val and test metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import sklearn
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from safetensors import SafetensorError
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from .config import Section, require
from .errors import CheckpointError, DataError, LowrankError
from .features import read_feature_file
from .io import atomic_path, load_tensors, read_json, save_tensors, write_json
from .metrics import classification_metrics, pixel_metrics, read_pixel_mask, token_pixel_masks, upsample_heatmap

log = logging.getLogger(__name__)

LocLoss = Literal["bce", "dice", "bce+dice"]


@dataclasses.dataclass(frozen=True)
class HeadConfig(Section):
    """Detection head and its two-phase pre-training."""

    key = "head"
    hidden: int = 128
    dropout: float = 0.1
    epochs_warm: int = 5
    epochs_joint: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    loc_loss: LocLoss = "bce+dice"
    loc_weight: float = 1.0
    threshold: float = 0.5
    num_examples: int = 4
    seed: int = 0

    def check(self, key: str) -> None:
        require(self.hidden >= 1, key, "hidden", "must be at least 1")
        require(0.0 <= self.dropout < 1.0, key, "dropout", "must be in [0, 1)")
        require(self.epochs_warm >= 0, key, "epochs_warm", "must be at least 0")
        require(self.epochs_joint >= 1, key, "epochs_joint", "must be at least 1 (the checkpoint is chosen in it)")
        require(self.lr > 0.0, key, "lr", "must be positive")
        require(self.weight_decay >= 0.0, key, "weight_decay", "must be at least 0")
        require(self.batch_size >= 1, key, "batch_size", "must be at least 1")
        require(self.loc_weight >= 0.0, key, "loc_weight", "must be at least 0")
        require(0.0 < self.threshold < 1.0, key, "threshold", "must be in (0, 1)")
        require(self.num_examples >= 1, key, "num_examples", "must be at least 1")


class DetectionHead(nn.Module):
    """LayerNorm + projection of each token; mean+max pooling to an image logit, a small conv net to a heat map."""

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.init_args = {"in_dim": in_dim, "hidden": hidden, "dropout": dropout}
        self.project = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.classify = nn.Linear(2 * hidden, 1)
        self.localise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T, C], T row-major over a grid_h x grid_w grid, any float dtype (cast to the head's)
        → (image logits [B], heat-map logits [B, grid_h, grid_w])."""
        return self.outputs(tokens, grid_h, grid_w)[:2]

    def outputs(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, ...]:
        """`forward`'s logits and the pooled (mean, max) projected tokens [B, 2 * hidden] they are classified from."""
        batch, count, _ = tokens.shape
        if count != grid_h * grid_w:
            raise LowrankError(f"detection head: {count} tokens do not fill a {grid_h}x{grid_w} grid")
        hidden = self.project(tokens.to(self.classify.weight.dtype))
        pooled = torch.cat([hidden.mean(dim=1), hidden.amax(dim=1)], dim=-1)
        grid = hidden.transpose(1, 2).reshape(batch, -1, grid_h, grid_w)
        return self.classify(pooled).squeeze(-1), self.localise(grid).squeeze(1), pooled


def save_head(head: DetectionHead, path: str | Path, metadata: dict | None = None) -> None:
    """Weights to `path` (safetensors), constructor arguments to the same name with `.json`."""
    save_tensors(path, {k: v.detach().cpu() for k, v in head.state_dict().items()}, metadata)
    write_json(Path(path).with_suffix(".json"), head.init_args)


def load_head(path: str | Path) -> DetectionHead:
    """Rebuild a head written by `save_head`, in eval mode, on the CPU."""
    path = Path(path)
    args_path = path.with_suffix(".json")
    for needed in (path, args_path):
        if not needed.is_file():
            raise CheckpointError(f"{needed}: head checkpoint file does not exist")
    try:
        head = DetectionHead(**read_json(args_path))
        head.load_state_dict(load_tensors(path)[0])
    except (TypeError, ValueError, RuntimeError, SafetensorError) as err:
        reason = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: does not rebuild a head with {args_path} ({reason})") from None
    return head.eval()


def head_losses(image_logits: torch.Tensor, map_logits: torch.Tensor, labels: torch.Tensor,
                token_masks: torch.Tensor, has_mask: torch.Tensor,
                loc_loss: LocLoss = "bce+dice") -> tuple[torch.Tensor, torch.Tensor]:
    """(classification BCE, localisation loss on the records with a mask).

    The localisation loss is BCE against the soft token masks and/or a soft Dice loss over the batch; it is a
    constant 0 (no gradient) when no record of the batch has a mask.
    """
    classification = F.binary_cross_entropy_with_logits(image_logits, labels.float())
    keep = has_mask.bool()
    if not keep.any():
        return classification, torch.zeros((), device=image_logits.device)
    logits, target = map_logits[keep], token_masks[keep].float()
    parts = loc_loss.split("+")
    localisation = torch.zeros((), device=image_logits.device)
    if "bce" in parts:
        localisation = localisation + F.binary_cross_entropy_with_logits(logits, target)
    if "dice" in parts:
        probs = logits.sigmoid()
        localisation = localisation + 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return classification, localisation


@torch.no_grad()
def predict(head: DetectionHead, features: torch.Tensor, grid_h: int, grid_w: int,
            batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image logits [N] and heat-map logits [N, grid_h, grid_w] of `features` in eval mode, returned on the CPU."""
    head.eval()
    device = next(head.parameters()).device
    outputs = [head(batch.to(device), grid_h, grid_w) for batch in features.split(batch_size)]
    return torch.cat([o[0] for o in outputs]).cpu(), torch.cat([o[1] for o in outputs]).cpu()


# ---------------------------------------------------------------- cached features


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
    """One split of the `extract_features` cache (features keep their stored dtype; the head casts per batch)."""

    path: Path
    features: torch.Tensor
    labels: torch.Tensor
    token_masks: torch.Tensor
    has_mask: torch.Tensor
    grid_h: int
    grid_w: int
    image_size: int
    image_paths: list | None
    mask_paths: list | None


def load_feature_split(path: str | Path) -> FeatureSplit:
    """Read and check one cached feature file; every problem raises DataError naming the file."""
    path = Path(path)
    tensors, meta = read_feature_file(path)
    for name in ("features", "labels", "token_masks", "has_mask"):
        if name not in tensors:
            raise DataError(f"{path}: tensor '{name}' is missing")
    for name in ("grid_h", "grid_w", "image_size"):
        if not isinstance(meta.get(name), int):
            raise DataError(f"{path}: metadata '{name}' is missing or not an int")
    features, grid_h, grid_w = tensors["features"], meta["grid_h"], meta["grid_w"]
    if features.dim() != 3 or features.shape[1] != grid_h * grid_w:
        raise DataError(f"{path}: tensor 'features' has shape {tuple(features.shape)}, expected "
                        f"(N, {grid_h * grid_w}, C) for a {grid_h}x{grid_w} grid")
    n = features.shape[0]
    for name, shape in {"labels": (n,), "token_masks": (n, grid_h, grid_w), "has_mask": (n,)}.items():
        if tuple(tensors[name].shape) != shape:
            raise DataError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
    if n == 0:
        raise DataError(f"{path}: holds no records")
    for name in ("image_paths", "mask_paths"):
        if name in meta and len(meta[name]) != n:
            raise DataError(f"{path}: metadata '{name}' has {len(meta[name])} entries for {n} records")
    return FeatureSplit(path, features, tensors["labels"].long(), tensors["token_masks"].float(),
                        tensors["has_mask"], grid_h, grid_w, meta["image_size"],
                        meta.get("image_paths"), meta.get("mask_paths"))


def _check_compatible(reference: FeatureSplit, split: FeatureSplit) -> None:
    if (split.grid_h, split.grid_w) != (reference.grid_h, reference.grid_w):
        raise DataError(f"{split.path}: token grid {split.grid_h}x{split.grid_w} does not match "
                        f"{reference.grid_h}x{reference.grid_w} of {reference.path}")
    if split.features.shape[-1] != reference.features.shape[-1]:
        raise DataError(f"{split.path}: feature width {split.features.shape[-1]} does not match "
                        f"{reference.features.shape[-1]} of {reference.path}")


def _pixel_masks(split: FeatureSplit) -> list[torch.Tensor | None]:
    """The real pixel masks named in the metadata; the upsampled token masks when the metadata names none."""
    if split.mask_paths is None:
        log.warning("%s: no mask_paths metadata; pixel metrics use the token masks upsampled to %d px",
                    split.path, split.image_size)
        return token_pixel_masks(split.token_masks, split.has_mask, split.image_size)
    return [read_pixel_mask(spec) for spec in split.mask_paths]


# ---------------------------------------------------------------- training


def pretrain_head(train_path: str | Path, val_path: str | Path, test_path: str | Path, cfg: HeadConfig,
                  out_dir: str | Path) -> dict:
    """Train the head (warm, then joint), keep the best joint-phase val ROC-AUC (ties, or a single-class val
    split: the lowest val loss), evaluate, and write to `out_dir`:
    `head.safetensors` + `head.json` (constructor arguments), `history.csv`, `heatmaps.png`, `metrics.json`
    (written last). Returns the metrics."""
    out_dir = Path(out_dir)
    train, val, test = (load_feature_split(p) for p in (train_path, val_path, test_path))
    _check_compatible(train, val)
    _check_compatible(train, test)
    masks = {"val": _pixel_masks(val), "test": _pixel_masks(test)}
    val_has_both_classes = 0 < int(val.labels.sum()) < len(val.labels)
    if not val_has_both_classes:
        log.warning("%s: a single class, val ROC-AUC undefined; the checkpoint is chosen by val loss", val.path)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    head = DetectionHead(train.features.shape[-1], cfg.hidden, cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = DataLoader(TensorDataset(train.features, train.labels, train.token_masks, train.has_mask),
                        batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))

    history, best, epoch = [], None, 0
    started = time.perf_counter()
    with tqdm(total=cfg.epochs_warm + cfg.epochs_joint, desc="pretrain_head", unit="epoch") as progress:
        for phase, epochs in (("warm", cfg.epochs_warm), ("joint", cfg.epochs_joint)):
            for phase_epoch in range(epochs):
                epoch += 1
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * phase_epoch / epochs))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                row = {"epoch": epoch, "phase": phase, "lr": lr}
                row |= _train_epoch(head, loader, optimizer, train, cfg, joint=phase == "joint")
                val_logits, val_maps = predict(head, val.features, val.grid_h, val.grid_w, cfg.batch_size)
                cls, loc = head_losses(val_logits, val_maps, val.labels, val.token_masks, val.has_mask, cfg.loc_loss)
                row |= {"val_loss": float(cls + cfg.loc_weight * loc if phase == "joint" else cls),
                        "val_cls_loss": float(cls), "val_loc_loss": float(loc),
                        "val_roc_auc": float(roc_auc_score(val.labels, val_logits)) if val_has_both_classes else None}
                history.append(row)
                log.info("epoch %d (%s): train loss %.4f, val loss %.4f, val ROC-AUC %s", epoch, phase,
                         row["train_loss"], row["val_loss"], row["val_roc_auc"])
                progress.set_postfix(phase=phase, val_roc_auc=row["val_roc_auc"], val_loss=row["val_loss"])
                progress.update()
                score = (row["val_roc_auc"] if val_has_both_classes else 0.0, -row["val_loss"])
                if phase == "joint" and (best is None or score > best["score"]):
                    best = {"score": score, "epoch": epoch, "val_roc_auc": row["val_roc_auc"],
                            "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
    train_seconds = time.perf_counter() - started
    head.load_state_dict(best["state"])

    metrics = {"best_epoch": best["epoch"], "best_val_roc_auc": best["val_roc_auc"],
               "selected_by": "val_roc_auc" if val_has_both_classes else "val_loss",
               "pixel_masks": "token_masks" if test.mask_paths is None else "mask_paths"}
    predictions = {}
    for name, split in (("val", val), ("test", test)):
        logits, maps = predict(head, split.features, split.grid_h, split.grid_w, cfg.batch_size)
        predictions[name] = (logits.sigmoid(), maps.sigmoid())
        metrics[name] = {"classification": classification_metrics(predictions[name][0], split.labels, cfg.threshold),
                         "pixel": pixel_metrics(predictions[name][1], masks[name], cfg.threshold)}
    metrics |= {"head": head.init_args, "parameters": sum(p.numel() for p in head.parameters()),
                "train_seconds": train_seconds, "device": str(device), "config": cfg.to_dict(),
                "versions": {"torch": torch.__version__, "scikit-learn": sklearn.__version__}}

    save_head(head, out_dir / "head.safetensors",
              {"best_epoch": best["epoch"], "val_roc_auc": best["val_roc_auc"], "selected_by": metrics["selected_by"]})
    with atomic_path(out_dir / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    _plot_examples(out_dir / "heatmaps.png", test, masks["test"], *predictions["test"], cfg.num_examples)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _train_epoch(head: DetectionHead, loader: DataLoader, optimizer: torch.optim.Optimizer, train: FeatureSplit,
                 cfg: HeadConfig, joint: bool) -> dict:
    """One pass over `loader` (the localisation loss is optimised only when `joint`); returns the
    record-weighted mean loss parts."""
    head.train()
    device = next(head.parameters()).device
    totals, records = np.zeros(3), 0
    for tokens, labels, token_masks, has_mask in loader:
        image_logits, map_logits = head(tokens.to(device), train.grid_h, train.grid_w)
        cls, loc = head_losses(image_logits, map_logits, labels.to(device), token_masks.to(device),
                               has_mask.to(device), cfg.loc_loss)
        loss = cls + cfg.loc_weight * loc if joint else cls
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += len(labels) * np.array([loss.item(), cls.item(), loc.item()])
        records += len(labels)
    return dict(zip(("train_loss", "train_cls_loss", "train_loc_loss"), (totals / records).tolist()))


def _plot_examples(path: Path, split: FeatureSplit, masks: list, image_probs: torch.Tensor,
                   heatmaps: torch.Tensor, count: int) -> None:
    """A grid of test records (image, true mask, predicted heat map): tampered ones first, and one real one."""
    with_mask = [i for i, mask in enumerate(masks) if mask is not None]
    tampered = [i for i in with_mask if split.labels[i] == 1]
    real = [i for i in with_mask if split.labels[i] == 0]
    chosen = (tampered[:count - 1] + real[:1] + tampered[count - 1:] + real[1:])[:count]
    figure = Figure(figsize=(9, 3 * max(1, len(chosen))))
    if not chosen:
        figure.text(0.5, 0.5, "no test record has a pixel mask", ha="center")
    axes = figure.subplots(len(chosen), 3, squeeze=False) if chosen else []
    for row, index in zip(axes, chosen):
        mask = masks[index]
        row[0].imshow(_example_image(split, index, mask.shape))
        row[0].set_title(f"label {int(split.labels[index])}, p(tampered) {float(image_probs[index]):.2f}")
        row[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        row[1].set_title("true mask")
        row[2].imshow(upsample_heatmap(heatmaps[index], tuple(mask.shape)), cmap="magma", vmin=0, vmax=1)
        row[2].set_title("predicted heat map")
        for axis in row:
            axis.set_axis_off()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80)


def _example_image(split: FeatureSplit, index: int, size: tuple[int, int]) -> np.ndarray:
    """The record's image at the mask's size; a grey square (with a warning) when it cannot be read."""
    image_path = split.image_paths[index] if split.image_paths else None
    if image_path is not None:
        try:
            with Image.open(image_path) as image:
                return np.asarray(image.convert("RGB").resize((size[1], size[0])))
        except OSError as err:  # includes UnidentifiedImageError
            log.warning("%s: image of record %d unreadable (%s)", split.path, index, err)
    log.warning("%s: record %d drawn grey in the heat-map examples (no readable image)", split.path, index)
    return np.full((*size, 3), 128, dtype=np.uint8)
