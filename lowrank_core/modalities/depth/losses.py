"""The depth training loss, after VGGT's: depth regression, its confidence-weighted form, depth gradients, camera.

All depth terms work on depth as the batch gives it (metres for ETH3D), unnormalised: plain L1 keeps the loss in
the units of the `mae` / `rmse` metrics, and the confidence term's residual is the same |d − d*| as the
regression's, so its optimum conf = α / |d − d*| reads in metres too. Mixing scenes of very different scale in one
run is the batch builder's business (VGGT divides each scene by its mean point distance before the loss).
The gradient term compares finite differences of depth, not of log depth, for the same reason.
"""

from __future__ import annotations

import dataclasses

import torch

from ...config import Section, require

DEPTH_TERMS = ("regression", "confidence", "gradient", "camera")


@dataclasses.dataclass(frozen=True)
class DepthLossConfig(Section):
    """Weights of the depth loss terms, the confidence regulariser α, and the fewest valid pixels a batch needs."""

    key = "depth_loss"
    camera_weight: float = 2.0
    confidence_weight: float = 5.0
    regression_weight: float = 5.0
    gradient_weight: float = 5.0
    confidence_alpha: float = 0.2
    min_valid_pixels: int = 32

    def check(self, key: str) -> None:
        for name in DEPTH_TERMS:
            require(getattr(self, f"{name}_weight") >= 0, key, f"{name}_weight", "must not be negative")
        require(any(getattr(self, f"{name}_weight") > 0 for name in DEPTH_TERMS), key, "*_weight",
                "must not all be zero")
        require(self.confidence_alpha > 0, key, "confidence_alpha", "must be positive")
        require(self.min_valid_pixels >= 1, key, "min_valid_pixels", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class DepthLossResult:
    """The scalar loss to backpropagate, its unweighted terms (and `total`) as floats, and whether it was skipped."""

    loss: torch.Tensor
    terms: dict[str, float]
    skipped: bool


def depth_loss(pred_depth: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor,
               confidence: torch.Tensor | None = None, pose_encoding: torch.Tensor | None = None,
               gt_pose_encoding: torch.Tensor | None = None,
               cfg: DepthLossConfig = DepthLossConfig()) -> DepthLossResult:
    """Σ weight · term over the terms this batch can give; depth maps are [..., H, W], `valid` a bool mask of them.

    regression: mean |d − d*| over valid pixels. confidence (only with `confidence`, positive, e.g. VGGT's
    1 + exp(x)): mean conf·|d − d*| − α·log conf over valid pixels. gradient: mean |Δd − Δd*| of x and y finite
    differences over the pixel pairs whose two pixels are valid (0 when there are none). camera (only with both
    pose encodings): mean |p − p*|. A term that cannot be computed is left out of `terms` and of the loss.
    With fewer than `cfg.min_valid_pixels` valid pixels the batch is skipped: `loss` is 0 but still attached to
    the graph of every given output (zero gradients), so that every process of a data-parallel run still
    backpropagates through the same parameters.
    """
    if pred_depth.shape != gt_depth.shape or pred_depth.shape != valid.shape or pred_depth.dim() < 2:
        raise ValueError(f"pred_depth {tuple(pred_depth.shape)}, gt_depth {tuple(gt_depth.shape)} and valid "
                         f"{tuple(valid.shape)} must be equal [..., H, W] shapes")
    if confidence is not None and confidence.shape != pred_depth.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} must have pred_depth's shape {tuple(pred_depth.shape)}")
    if pose_encoding is not None and gt_pose_encoding is not None and pose_encoding.shape != gt_pose_encoding.shape:
        raise ValueError(f"pose_encoding {tuple(pose_encoding.shape)} and gt_pose_encoding "
                         f"{tuple(gt_pose_encoding.shape)} must have the same shape")
    valid = valid.bool()
    if int(valid.sum()) < cfg.min_valid_pixels:
        outputs = (pred_depth, confidence, pose_encoding)
        return DepthLossResult(loss=0 * sum(t.sum() for t in outputs if t is not None), terms={}, skipped=True)
    # Boolean indexing before any arithmetic: invalid ground truth (0, NaN) never reaches the values or the gradients
    residual = (pred_depth[valid] - gt_depth[valid]).abs()
    terms = {"regression": residual.mean(), "gradient": _gradient_term(pred_depth, gt_depth, valid)}
    if confidence is not None:
        conf = confidence[valid]
        terms["confidence"] = (conf * residual - cfg.confidence_alpha * conf.log()).mean()
    if pose_encoding is not None and gt_pose_encoding is not None:
        terms["camera"] = (pose_encoding - gt_pose_encoding).abs().mean()
    loss = sum(getattr(cfg, f"{name}_weight") * value for name, value in terms.items())
    values = {name: value.item() for name, value in terms.items()}
    return DepthLossResult(loss=loss, terms={**values, "total": loss.item()}, skipped=False)


def _gradient_term(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |Δpred − Δgt| over horizontal and vertical neighbour pairs whose two pixels are both valid."""
    differences = []
    for dim in (-1, -2):
        n = pred.shape[dim]
        pairs = valid.narrow(dim, 1, n - 1) & valid.narrow(dim, 0, n - 1)
        step_pred = pred.narrow(dim, 1, n - 1) - pred.narrow(dim, 0, n - 1)
        step_gt = gt.narrow(dim, 1, n - 1) - gt.narrow(dim, 0, n - 1)
        differences.append((step_pred[pairs] - step_gt[pairs]).abs())
    differences = torch.cat(differences)
    return differences.mean() if differences.numel() else 0 * pred.sum()
