"""Detection metrics shared by the head pre-training and the LoRA evaluation.

Image level: `classification_metrics(scores, labels)` for any probability-like score (head logit through a
sigmoid, LM probability of "tampered"), with DeLong's interval for the ROC-AUC: how far sampling the test split alone
could move it. Pixel level: `pixel_metrics(heatmaps, masks)` for token-grid heat maps,
each upsampled (bilinear) to the size of its own pixel mask, with the all-zero prediction reported alongside as
the baseline to beat. Undefined values (AUROC of a single-class split, IoU of nothing against nothing) come back as
None with a warning, never as a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import norm
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from .errors import DataError

log = logging.getLogger(__name__)

_ZERO_MASK = re.compile(r"^(\d+)x(\d+)$")


def classification_metrics(scores, labels, threshold: float = 0.5) -> dict:
    """Accuracy and F1 of `scores >= threshold`, ROC-AUC (with its 95% interval, `roc_auc_interval`) and average
    precision of the raw scores, and the share of samples predicted positive (0 or 1: one answer for every sample).

    ROC-AUC is None when `labels` hold a single class, average precision None when they hold no positive.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal, non-empty vectors")
    predicted = (scores >= threshold).astype(np.int64)
    positives = int(labels.sum())
    roc_auc = average_precision = None
    interval = (None, None)
    if 0 < positives < labels.size:
        roc_auc = float(roc_auc_score(labels, scores))
        interval = roc_auc_interval(scores, labels)
    else:
        log.warning("ROC-AUC undefined: all %d labels are %d; reported as null", labels.size, labels[0])
    if positives:
        average_precision = float(average_precision_score(labels, scores))
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0.0)),
        "roc_auc": roc_auc,
        "roc_auc_low": interval[0],
        "roc_auc_high": interval[1],
        "average_precision": average_precision,
        "positive_rate": float(predicted.mean()),
        "threshold": threshold,
        "n": int(labels.size),
        "n_positive": positives,
    }


def roc_auc_interval(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> tuple:
    """DeLong's `confidence` interval for the ROC-AUC of `scores` (normal approximation, clipped to [0, 1]; None
    bounds with fewer than 2 samples of a class). Per sample, the share of the other class it is ranked beyond (ties
    count half) has a variance over the class's samples; the AUC's variance is their sum, each over its count."""
    positive, negative = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    if min(positive.size, negative.size) < 2:
        return None, None

    def ranked_below(sorted_scores, values):  # per value, how many of sorted_scores lie below it (ties half)
        return (np.searchsorted(sorted_scores, values, "left") + np.searchsorted(sorted_scores, values, "right")) / 2

    beyond_negatives = ranked_below(negative, positive) / negative.size  # per positive sample
    below_positives = 1 - ranked_below(positive, negative) / positive.size  # per negative sample
    auc = beyond_negatives.mean()
    error = np.sqrt(beyond_negatives.var(ddof=1) / positive.size + below_positives.var(ddof=1) / negative.size)
    half_width = norm.ppf(0.5 + confidence / 2) * error
    return float(max(0.0, auc - half_width)), float(min(1.0, auc + half_width))


def upsample_heatmap(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a [h, w] map to `size` (height, width)."""
    return F.interpolate(heatmap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def pixel_metrics(heatmaps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None],
                  threshold: float = 0.5) -> dict:
    """Pixel F1 / IoU of thresholded heat maps (probabilities at grid size) against boolean pixel masks.

    Each heat map is upsampled to its mask's size. `pixel_f1` / `pixel_iou` pool the counts over all pixels;
    `pixel_f1_mean` / `pixel_iou_mean` average per image, an image with neither a true nor a predicted pixel
    scoring 1. Records whose mask is None are skipped (with a warning). The same figures for an all-zero
    prediction come back under `all_zero`.
    """
    if len(heatmaps) != len(masks):
        raise ValueError(f"{len(heatmaps)} heat maps but {len(masks)} masks")
    predicted, zero, skipped = [], [], 0
    for heatmap, mask in zip(heatmaps, masks):
        if mask is None:
            skipped += 1
            continue
        mask = mask.bool()
        predicted.append(_counts(upsample_heatmap(heatmap, tuple(mask.shape)) >= threshold, mask))
        zero.append(_counts(torch.zeros_like(mask), mask))
    if skipped:
        log.warning("pixel metrics: %d of %d records have no pixel mask and are skipped", skipped, len(masks))
    return {**_summary(predicted), "threshold": threshold, "n_images": len(predicted), "n_skipped": skipped,
            "all_zero": _summary(zero)}


def _counts(predicted: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of two boolean maps."""
    true_positives = int((predicted & mask).sum())
    return true_positives, int(predicted.sum()) - true_positives, int(mask.sum()) - true_positives


def _summary(counts: list[tuple[int, int, int]]) -> dict:
    tp, fp, fn = (sum(column) for column in zip(*counts)) if counts else (0, 0, 0)
    pooled_f1, pooled_iou = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp, tp + fp + fn)
    if pooled_iou is None:
        log.warning("pooled pixel F1/IoU undefined: no tampered pixel in %d masks and none predicted", len(counts))
    per_image_f1 = [_ratio(2 * t, 2 * t + p + n) for t, p, n in counts]
    per_image_iou = [_ratio(t, t + p + n) for t, p, n in counts]
    return {
        "pixel_f1": pooled_f1,
        "pixel_iou": pooled_iou,
        "pixel_f1_mean": _mean_empty_is_one(per_image_f1),
        "pixel_iou_mean": _mean_empty_is_one(per_image_iou),
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _mean_empty_is_one(values: list[float | None]) -> float | None:
    return float(np.mean([1.0 if v is None else v for v in values])) if values else None


def read_pixel_mask(spec: str | None) -> torch.Tensor | None:
    """A boolean [H, W] mask from a PNG path (binarised at 50% grey), "HxW" (all zero), or None (no mask)."""
    if spec is None:
        return None
    if match := _ZERO_MASK.match(spec):
        return torch.zeros(int(match[1]), int(match[2]), dtype=torch.bool)
    try:
        with Image.open(spec) as image:
            return torch.from_numpy(np.asarray(image.convert("L")) > 127)
    except FileNotFoundError:
        raise DataError(f"{spec}: pixel mask does not exist") from None
    except OSError as err:  # includes UnidentifiedImageError
        raise DataError(f"{spec}: pixel mask is unreadable ({err})") from None


def token_pixel_masks(token_masks: torch.Tensor, has_mask: torch.Tensor, image_size: int) -> list[torch.Tensor | None]:
    """Fallback pixel masks when no mask files are known: token masks [N, h, w] upsampled (nearest) to
    `image_size` and binarised at half a cell; None where `has_mask` is 0."""
    upsampled = F.interpolate(token_masks[:, None].float(), size=(image_size, image_size), mode="nearest")[:, 0] >= 0.5
    return [mask if keep else None for mask, keep in zip(upsampled, has_mask.bool().tolist())]
