"""What a depth arm, the teacher and the references read of the config beyond training: the loss and the alignment."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ...config import Section
from .losses import DepthLossConfig


@dataclasses.dataclass(frozen=True)
class DepthTaskConfig(Section):
    """`depth`: the loss weights (defaults as the VGGT-on-ETH3D study: camera ×2, confidence, regression and
    gradient ×5) and how predictions are aligned to the ground truth before the metrics (`none` for metric-depth
    models; `median` scaling or `least_squares` scale and shift for relative-depth ones)."""

    key = "depth"
    loss: DepthLossConfig = DepthLossConfig()
    alignment: Literal["none", "median", "least_squares"] = "none"
