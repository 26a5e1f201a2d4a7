"""Depth metrics: the standard monocular-depth error and accuracy figures, per image, then averaged over images.

Every metric is computed per image over its valid pixels and averaged over the images that have at least one
valid pixel, so a large image counts as much as a small one. Before the metrics each image's prediction can be
aligned to its ground truth: `median` scaling (scale-ambiguous predictions) or `least_squares` scale and shift
(affine-ambiguous ones, e.g. disparity-like outputs).
"""

from __future__ import annotations

from typing import Literal

import torch

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "mae", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "mae"})
ALIGNMENTS = ("none", "median", "least_squares")
# Predictions are clamped to this (in depth units) for the log and ratio metrics, as an aligned one can reach <= 0
MIN_DEPTH = 1e-6

Alignment = Literal["none", "median", "least_squares"]


def depth_metrics(pred, gt, valid, alignment: Alignment = "none") -> dict:
    """abs_rel, sq_rel, rmse, rmse_log, mae, delta1..3 of `pred` against `gt` ([N, H, W]) over `valid` pixels.

    Each metric is the mean over images of its per-image value; `images` counts the images with a valid pixel.
    Valid ground truth must be finite and positive; invalid pixels may hold anything (0, NaN). When no image has
    a valid pixel every metric is None and `images` is 0.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment {alignment!r} is not one of {', '.join(ALIGNMENTS)}")
    pred, gt, valid = torch.as_tensor(pred), torch.as_tensor(gt), torch.as_tensor(valid).bool()
    if pred.dim() != 3 or pred.shape != gt.shape or pred.shape != valid.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, gt {tuple(gt.shape)} and valid {tuple(valid.shape)} "
                         "must all be [N, H, W]")
    per_image = []
    for p, g, m in zip(pred.detach().double(), gt.double(), valid):
        if not m.any():
            continue
        p, g = p[m], g[m]
        if not (torch.isfinite(g).all() and (g > 0).all()):
            raise ValueError("ground-truth depth must be finite and positive at every valid pixel")
        per_image.append(_image_metrics(_align(p, g, alignment), g))
    if not per_image:
        return {**dict.fromkeys(DEPTH_METRICS), "images": 0}
    return {**{name: sum(m[name] for m in per_image) / len(per_image) for name in DEPTH_METRICS},
            "images": len(per_image)}


def _align(p: torch.Tensor, g: torch.Tensor, alignment: str) -> torch.Tensor:
    """`p` scaled (median) or scaled and shifted (least squares) onto `g`; 1-D tensors of one image's valid pixels."""
    if alignment == "median":
        # a prediction whose median is not positive has no meaningful scale and is left as it is
        return p * (_median(g) / _median(p)) if _median(p) > 0 else p
    if alignment == "least_squares":
        # argmin_{s,t} Σ (s·p + t − g)²: s = cov(p, g) / var(p), t = mean(g) − s·mean(p); any s fits a constant p
        dp, dg = p - p.mean(), g - g.mean()
        variance = (dp * dp).sum()
        scale = (dp * dg).sum() / variance if variance > 0 else torch.ones((), dtype=p.dtype)
        return scale * p + (g.mean() - scale * p.mean())
    return p


def _median(x: torch.Tensor) -> torch.Tensor:
    """The middle value, or the mean of the two middle ones (torch.median takes the lower one)."""
    values = x.sort().values
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def _image_metrics(p: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    error = p - g
    positive = p.clamp(min=MIN_DEPTH)
    ratio = torch.maximum(positive / g, g / positive)
    return {
        "abs_rel": float((error.abs() / g).mean()),
        "sq_rel": float((error**2 / g).mean()),
        "rmse": float(error.pow(2).mean().sqrt()),
        "rmse_log": float((positive.log() - g.log()).pow(2).mean().sqrt()),
        "mae": float(error.abs().mean()),
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
    }
