"""Classification and pixel metrics against hand-computed values, and the pixel-mask readers."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from lowrank_core.errors import DataError
from lowrank_core.metrics import (classification_metrics, pixel_metrics, read_pixel_mask, token_pixel_masks,
                                  upsample_heatmap)


def test_classification_metrics_match_hand_computed_values():
    # predictions at 0.5: [1, 0, 1, 0] against [1, 0, 0, 1]: TP 1, FP 1, FN 1, TN 1.
    # ROC-AUC: of the 4 (positive, negative) pairs, 0.9>0.2, 0.9>0.6, 0.4>0.2 rank right, 0.4<0.6 wrong → 3/4.
    # AP: ranked 0.9 (+), 0.6 (-), 0.4 (+), 0.2 (-) → 0.5 * 1 + 0.5 * 2/3.
    result = classification_metrics([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 1])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(0.5)
    assert result["roc_auc"] == pytest.approx(0.75)
    assert result["average_precision"] == pytest.approx(0.5 + 1 / 3)
    assert (result["n"], result["n_positive"]) == (4, 2)
    assert result["positive_rate"] == pytest.approx(0.5)


def test_the_roc_auc_interval_matches_delong_by_hand_and_a_bootstrap():
    # By hand on the 4 samples above: per positive (0.9, 0.4) the share of negatives below it, 1 and 0.5; per negative
    # (0.2, 0.6) the share of positives above it, 1 and 0.5. Each has variance 0.125, over 2 samples: 0.0625 + 0.0625.
    result = classification_metrics([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 1])
    assert result["roc_auc_low"] == pytest.approx(0.75 - 1.959964 * 0.125 ** 0.5, abs=1e-5)
    assert result["roc_auc_high"] == 1.0  # clipped
    # A test split like the default's (48 + 48) with a weak signal, against the percentile bootstrap's 95% interval
    # (sklearn's ROC-AUC on 2000 resamples of the samples): the two agree to sampling precision.
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 48)
    scores = rng.normal(0.4 * labels, 1.0)
    result = classification_metrics(scores, labels)
    draws = [rng.choice(48, 48) for _ in range(2000)]
    boot = [roc_auc_score(labels[np.r_[i, 48 + j]], scores[np.r_[i, 48 + j]]) for i, j in zip(draws, draws[::-1])]
    assert result["roc_auc_low"] == pytest.approx(np.percentile(boot, 2.5), abs=0.02)
    assert result["roc_auc_high"] == pytest.approx(np.percentile(boot, 97.5), abs=0.02)
    assert result["roc_auc_low"] < result["roc_auc"] < result["roc_auc_high"]
    # Ties count half: constant scores rank nothing, an AUC of 0.5 under any resampling, so no width either.
    tied = classification_metrics([0.5] * 6, [1, 0] * 3)
    assert tied["roc_auc"] == 0.5 and tied["roc_auc_low"] == tied["roc_auc_high"] == 0.5


@pytest.mark.parametrize("scores, rate", [([0.9, 0.8, 0.7, 0.6], 1.0), ([0.1, 0.2, 0.3, 0.4], 0.0)])
def test_one_answer_for_every_sample_shows_as_a_positive_rate_of_0_or_1(scores, rate):
    assert classification_metrics(scores, [1, 0, 0, 1])["positive_rate"] == rate


def test_classification_threshold_moves_the_decision_only():
    low = classification_metrics([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 1], threshold=0.3)
    assert low["accuracy"] == pytest.approx(0.75)  # predictions [1, 0, 1, 1]
    assert low["roc_auc"] == pytest.approx(0.75)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_null_auroc_with_a_warning(caplog, label):
    with caplog.at_level(logging.WARNING):
        result = classification_metrics([0.1, 0.7, 0.8], [label] * 3)
    assert result["roc_auc"] is None
    assert "ROC-AUC undefined" in caplog.text
    assert result["accuracy"] == pytest.approx(2 / 3 if label else 1 / 3)
    assert result["average_precision"] == (pytest.approx(1.0) if label else None)


def test_classification_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must be equal"):
        classification_metrics([0.1, 0.2], [1])


def test_pixel_metrics_match_hand_computed_values():
    heatmaps = [torch.tensor([[0.9, 0.8], [0.1, 0.2]]), torch.zeros(2, 2)]
    masks = [torch.tensor([[1, 0], [1, 0]], dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)]
    result = pixel_metrics(heatmaps, masks)
    # image 1: TP 1, FP 1, FN 1 → F1 1/2, IoU 1/3; image 2: nothing true, nothing predicted → 1 per image.
    assert result["pixel_f1"] == pytest.approx(0.5)
    assert result["pixel_iou"] == pytest.approx(1 / 3)
    assert result["pixel_f1_mean"] == pytest.approx(0.75)
    assert result["pixel_iou_mean"] == pytest.approx(2 / 3)
    # all-zero prediction: TP 0, FN 2 pooled; per image 0 and 1.
    assert result["all_zero"] == {"pixel_f1": 0.0, "pixel_iou": 0.0, "pixel_f1_mean": 0.5, "pixel_iou_mean": 0.5}
    assert (result["n_images"], result["n_skipped"]) == (2, 0)


def test_heatmaps_are_upsampled_to_each_mask_size():
    heatmap = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # left half tampered at grid size
    left_half = torch.zeros(6, 8, dtype=torch.bool)
    left_half[:, :4] = True
    assert upsample_heatmap(heatmap, (6, 8)).shape == (6, 8)
    result = pixel_metrics([heatmap], [left_half])
    assert result["pixel_iou"] == pytest.approx(1.0)


def test_records_without_mask_are_skipped_with_a_count(caplog):
    heatmaps = torch.stack([torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2)])
    masks = [None, torch.ones(2, 2, dtype=torch.bool), None]
    with caplog.at_level(logging.WARNING):
        result = pixel_metrics(heatmaps, masks)
    assert "2 of 3 records have no pixel mask" in caplog.text
    assert (result["n_images"], result["n_skipped"]) == (1, 2)
    assert result["pixel_iou"] == pytest.approx(1.0)


def test_nothing_true_and_nothing_predicted_gives_null_pooled_scores(caplog):
    with caplog.at_level(logging.WARNING):
        result = pixel_metrics([torch.zeros(2, 2)], [torch.zeros(4, 4, dtype=torch.bool)])
    assert result["pixel_iou"] is None and result["pixel_f1"] is None
    assert result["pixel_iou_mean"] == pytest.approx(1.0)
    assert "undefined" in caplog.text


def test_read_pixel_mask_handles_png_zero_spec_and_none(tmp_path):
    pixels = np.zeros((5, 7), dtype=np.uint8)
    pixels[1:3, 2:6] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    mask = read_pixel_mask(str(tmp_path / "mask.png"))
    assert mask.dtype == torch.bool and mask.shape == (5, 7) and int(mask.sum()) == 8
    zero = read_pixel_mask("12x9")
    assert zero.shape == (12, 9) and not zero.any()
    assert read_pixel_mask(None) is None


def test_read_pixel_mask_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(DataError, match="nope.png: pixel mask does not exist"):
        read_pixel_mask(str(tmp_path / "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: pixel mask is unreadable"):
        read_pixel_mask(str(tmp_path / "broken.png"))


def test_token_pixel_masks_upsample_and_skip_records_without_mask():
    token_masks = torch.tensor([[[1.0, 0.25], [0.5, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    masks = token_pixel_masks(token_masks, torch.tensor([1, 0], dtype=torch.uint8), image_size=4)
    assert masks[1] is None
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(masks[0], expected)
