"""Depth metrics against hand-computed values, alignment, per-image averaging; the depth loss terms; the figure."""

import math

import numpy as np
import pytest
import torch

from lowrank_core.errors import ConfigError
from lowrank_core.modalities.depth.losses import DepthLossConfig, depth_loss
from lowrank_core.modalities.depth.metrics import DEPTH_METRICS, LOWER_IS_BETTER, depth_metrics
from lowrank_core.modalities.depth.plots import depth_examples_figure


def test_depth_metrics_match_hand_computed_values():
    # valid (pred, gt): (1.2, 1), (0.5, 0.75), (1.9, 1); the invalid pixel has gt 0 and must not matter.
    # errors 0.2, -0.25, 0.9; ratios max(p/g, g/p) 1.2, 1.5, 1.9 against 1.25, 1.5625, 1.953125.
    pred = torch.tensor([[[1.2, 0.5], [1.9, 7.0]]])
    gt = torch.tensor([[[1.0, 0.75], [1.0, 0.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    result = depth_metrics(pred, gt, valid)
    assert result["abs_rel"] == pytest.approx((0.2 + 0.25 / 0.75 + 0.9) / 3)
    assert result["sq_rel"] == pytest.approx((0.04 + 0.0625 / 0.75 + 0.81) / 3)
    assert result["rmse"] == pytest.approx(math.sqrt((0.04 + 0.0625 + 0.81) / 3))
    assert result["rmse_log"] == pytest.approx(math.sqrt((math.log(1.2) ** 2 + math.log(2 / 3) ** 2
                                                          + math.log(1.9) ** 2) / 3))
    assert result["mae"] == pytest.approx((0.2 + 0.25 + 0.9) / 3)
    assert result["delta1"] == pytest.approx(1 / 3)
    assert result["delta2"] == pytest.approx(2 / 3)
    assert result["delta3"] == pytest.approx(1.0)
    assert result["images"] == 1
    assert set(result) == {*DEPTH_METRICS, "images"}
    assert LOWER_IS_BETTER == {"abs_rel", "sq_rel", "rmse", "rmse_log", "mae"}


@pytest.mark.parametrize("alignment, scale, shift", [("median", 2.0, 0.0), ("least_squares", 2.0, 0.5)])
def test_alignment_recovers_a_known_scale_and_shift(alignment, scale, shift):
    gt = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0)) * 4 + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[0, 0, :3] = False
    pred = (gt - shift) / scale
    aligned = depth_metrics(pred, gt, valid, alignment=alignment)
    assert aligned["abs_rel"] == pytest.approx(0, abs=1e-9)
    assert aligned["rmse"] == pytest.approx(0, abs=1e-9)
    assert aligned["delta1"] == 1.0
    assert depth_metrics(pred, gt, valid)["abs_rel"] > 0.1


def test_median_alignment_takes_the_middle_of_an_even_count():
    # medians: gt (2 + 4) / 2 = 3, pred (1 + 3) / 2 = 2 → pred scaled by 1.5: 1.5, 4.5 against 2, 4
    result = depth_metrics(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0, 4.0]]]), torch.ones(1, 1, 2, dtype=bool),
                           alignment="median")
    assert result["mae"] == pytest.approx(0.5)


def test_metrics_average_per_image_not_pooled_and_skip_images_without_valid_pixels():
    # image 0: one valid pixel, abs_rel 1; image 1: three exact pixels, abs_rel 0; image 2: no valid pixel.
    # Per image: (1 + 0) / 2 = 0.5; pooling the four pixels would give 0.25.
    pred = torch.tensor([[[2.0, 9.0], [9.0, 9.0]], [[1.0, 2.0], [3.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [3.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    valid = torch.tensor([[[True, False], [False, False]], [[True, True], [True, False]],
                          [[False, False], [False, False]]])
    result = depth_metrics(pred, gt, valid)
    assert result["abs_rel"] == pytest.approx(0.5)
    assert result["delta1"] == pytest.approx(0.5)
    assert result["images"] == 2


def test_no_valid_pixel_gives_null_metrics():
    result = depth_metrics(torch.ones(2, 3, 3), torch.ones(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert result == {**dict.fromkeys(DEPTH_METRICS), "images": 0}


def test_bad_metric_input_is_refused():
    ones = torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="alignment"):
        depth_metrics(ones, ones, ones.bool(), alignment="affine")
    with pytest.raises(ValueError, match="positive"):
        depth_metrics(ones, torch.zeros(1, 2, 2), ones.bool())


# --- losses ---

CFG = DepthLossConfig(min_valid_pixels=4)


def _scene(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gt = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(seed)) * 5 + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[:, 0, 0] = False
    return gt, valid


def test_loss_is_zero_when_the_prediction_is_exact_and_positive_otherwise():
    gt, valid = _scene()
    exact = depth_loss(gt.clone(), gt, valid, cfg=CFG)
    assert exact.terms["regression"] == 0 and exact.terms["gradient"] == 0 and exact.terms["total"] == 0
    assert not exact.skipped
    off = depth_loss(gt + torch.rand(gt.shape, generator=torch.Generator().manual_seed(1)), gt, valid, cfg=CFG)
    assert off.terms["regression"] > 0 and off.terms["gradient"] > 0
    assert off.loss.item() == pytest.approx(CFG.regression_weight * off.terms["regression"]
                                            + CFG.gradient_weight * off.terms["gradient"], rel=1e-6)
    assert set(off.terms) == {"regression", "gradient", "total"}  # no confidence, no poses: not counted


def test_invalid_pixels_touch_neither_regression_nor_gradient():
    gt, valid = _scene()
    gt[:, 0, 0] = float("nan")  # what an invalid pixel may hold
    pred = gt.clone()
    pred[:, 0, 0] = 100.0
    pred.requires_grad_(True)
    result = depth_loss(pred, gt, valid, cfg=CFG)
    assert result.terms["regression"] == 0 and result.terms["gradient"] == 0
    result.loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_gradient_term_counts_pairs_of_valid_pixels_only():
    # one row [1, 2, 4], all valid: Δpred = 0 vs Δgt = 1, 2 on the x pairs → mean |1| + |2| over 2 pairs = 1.5
    pred, gt = torch.ones(1, 1, 3), torch.tensor([[[1.0, 2.0, 4.0]]])
    result = depth_loss(pred, gt, torch.ones(1, 1, 3, dtype=torch.bool), cfg=DepthLossConfig(min_valid_pixels=1))
    assert result.terms["gradient"] == pytest.approx(1.5)


def test_too_few_valid_pixels_skip_the_batch_with_zero_gradient():
    gt, _ = _scene()
    valid = torch.zeros_like(gt, dtype=torch.bool)
    valid[0, :1, :3] = True
    pred = (gt + 1).requires_grad_(True)
    conf = torch.ones_like(gt, requires_grad=True)
    result = depth_loss(pred, gt, valid, conf, cfg=DepthLossConfig(min_valid_pixels=32))
    assert result.skipped and result.loss.item() == 0 and result.terms == {}
    result.loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred)) and torch.equal(conf.grad, torch.zeros_like(conf))


def test_confidence_term_is_smallest_at_alpha_over_the_residual():
    gt, valid = _scene()
    residual = 0.5
    cfg = DepthLossConfig(min_valid_pixels=4, confidence_alpha=0.2)
    best = cfg.confidence_alpha / residual

    def term(conf: float) -> float:
        return depth_loss(gt + residual, gt, valid, torch.full_like(gt, conf), cfg=cfg).terms["confidence"]

    grid = np.linspace(0.1, 2.0, 191)
    assert grid[np.argmin([term(c) for c in grid])] == pytest.approx(best, abs=0.01)
    assert term(best) == pytest.approx(cfg.confidence_alpha - cfg.confidence_alpha * math.log(best))
    conf = torch.full_like(gt, best, requires_grad=True)
    depth_loss(gt + residual, gt, valid, conf, cfg=cfg).loss.backward()
    assert conf.grad.abs().max().item() < 1e-6


def test_all_terms_backpropagate_and_are_weighted_into_the_loss():
    gt, valid = _scene()
    pred = (gt * 1.1).requires_grad_(True)
    conf = torch.full_like(gt, 1.5, requires_grad=True)
    pose = torch.zeros(2, 9, requires_grad=True)
    result = depth_loss(pred, gt, valid, conf, pose, torch.ones(2, 9), cfg=CFG)
    assert result.terms["camera"] == pytest.approx(1.0)
    expected = sum(getattr(CFG, f"{name}_weight") * result.terms[name]
                   for name in ("regression", "confidence", "gradient", "camera"))
    assert result.terms["total"] == pytest.approx(expected, rel=1e-6)
    result.loss.backward()
    for tensor in (pred, conf, pose):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("values, message", [({"gradient_weight": -1.0}, "depth_loss.gradient_weight"),
                                             ({"camera_weight": 0, "confidence_weight": 0, "regression_weight": 0,
                                               "gradient_weight": 0}, "must not all be zero"),
                                             ({"confidence_alpha": 0}, "depth_loss.confidence_alpha"),
                                             ({"min_valid_pixels": 0}, "depth_loss.min_valid_pixels")])
def test_loss_config_checks_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        DepthLossConfig.from_dict(values)


# --- figure ---

def test_examples_figure_has_four_panels_per_example_row(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 5, (8, 10))
    valid = gt < 4
    rows = [{"title": "channels first", "image": rng.uniform(0, 1, (3, 8, 10)), "pred": gt + 0.3, "gt": gt,
             "valid": valid},
            {"title": "channels last, nothing valid", "image": rng.uniform(0, 1, (8, 10, 3)), "pred": gt, "gt": gt,
             "valid": np.zeros_like(valid)}]
    figure = depth_examples_figure(rows, max_depth=4.5)
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    assert len(panels) == 8 and [panels[0].get_title(), panels[4].get_title()] == [row["title"] for row in rows]
    figure.savefig(tmp_path / "examples.png")
    assert (tmp_path / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
