"""Vision-token feature extraction: the encoder's output after the patch merger, cached per split.

Each split becomes one safetensors file with `features` [N, T, C] (T = grid_h * grid_w tokens, row-major),
`labels` [N], `token_masks` [N, grid_h, grid_w] (tampered fraction of each token's cell) and `has_mask` [N];
its metadata records the token grid, the image paths and the model / config provenance. Qwen2.5-VL-3B at
448x448 gives [256, 2048] per image; the tiny default the same at tiny sizes.

A model with DeepStack mergers (Qwen3-VL) has more than one output: the final merger's tokens, which the language
model reads as its input at the image positions, and one set per DeepStack merger (from intermediate vision blocks),
added to the hidden states of its first layers at those positions. The features are the final merger's tokens alone,
as for Qwen2.5-VL (`get_image_features(...).pooler_output`): they are the image tokens the language model is given,
the same width as its embeddings (what the detection head's `in_dim` is checked against), and what a student's head
reads in training, so the cached features, the pre-trained head and the students' heads see the same thing.
Concatenating the DeepStack levels would widen the low-rank study's matrices and the head's input fourfold with
features the language model never receives as tokens. Qwen3-VL-2B at 512x512 gives [256, 2048] per image.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import __version__
from .config import Section, require
from .data import load_image, load_mask
from .errors import CheckpointError, DataError
from .io import load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FeatureConfig(Section):
    """How images are fed to the vision encoder and how the features are stored."""

    key = "features"
    image_size: int = 64
    batch_size: int = 16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    spectrum_tokens: int = 4096

    def check(self, key: str) -> None:
        require(self.image_size >= 16, key, "image_size", "must be at least 16")
        require(self.batch_size >= 1, key, "batch_size", "must be at least 1")
        require(self.spectrum_tokens >= 16, key, "spectrum_tokens", "must be at least 16")


def extract_features(model_info_path: str | Path, manifest_path: str | Path, split: str, cfg: FeatureConfig,
                     model_dtype: str, out_path: str | Path, stats_path: str | Path) -> dict:
    """Encode every image of `split` and write its feature file and statistics; returns the statistics."""
    from accelerate import Accelerator  # here: the readers of feature files (head, low-rank nets) need no model

    from .modeling import load_model, load_processor

    model_info = read_json(model_info_path)
    records = read_json(manifest_path)["splits"][split]["records"]
    processor = load_processor(model_info["path"])
    model = load_model(model_info["path"], model_dtype)
    if not hasattr(model, "get_image_features"):
        raise CheckpointError(f"{model_info['path']}: model has no vision encoder (get_image_features)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = accelerator.prepare_model(model.eval(), evaluation_mode=True)
    image_processor = processor.image_processor
    pixels = cfg.image_size * cfg.image_size
    chunks, grid = [], None
    for start in tqdm(range(0, len(records), cfg.batch_size), desc=f"features {split}", unit="batch"):
        batch = records[start:start + cfg.batch_size]
        images = [load_image(r["image_path"], cfg.image_size) for r in batch]
        inputs = image_processor(images, size={"shortest_edge": pixels, "longest_edge": pixels}, return_tensors="pt")
        with torch.inference_mode():
            out = accelerator.unwrap_model(model).get_image_features(
                inputs["pixel_values"].to(accelerator.device, model.dtype),
                inputs["image_grid_thw"].to(accelerator.device))
        chunks.extend(t.float().cpu() for t in getattr(out, "pooler_output", out))
        grid = _merged_grid(inputs["image_grid_thw"], image_processor.merge_size)
    grid_h, grid_w = grid
    features = torch.stack(chunks)
    masks, has_mask = token_masks(records, cfg.image_size, grid_h, grid_w)
    tensors = {
        "features": features.to(getattr(torch, cfg.dtype)),
        "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64),
        "token_masks": masks,
        "has_mask": has_mask,
    }
    metadata = {
        "split": split, "grid_h": grid_h, "grid_w": grid_w, "image_size": cfg.image_size,
        "hidden_size": features.shape[-1], "model": model_info["path"], "model_type": model_info["model_type"],
        "model_dtype": model_dtype, "features_config": cfg.to_dict(), "lowrank_core_version": __version__,
        "image_paths": [r["image_path"] for r in records], "mask_paths": [r["mask_path"] for r in records],
    }
    stats = feature_statistics(features, tensors["labels"], grid_h, grid_w, cfg.spectrum_tokens)
    save_tensors(out_path, tensors, metadata)
    write_json(stats_path, {**stats, "split": split, "model": model_info["path"]})
    log.info("%s: %d images -> features %s, grid %dx%d", split, len(records), tuple(features.shape), grid_h, grid_w)
    return stats


def _merged_grid(grid_thw: torch.Tensor, merge_size: int) -> tuple[int, int]:
    """The (height, width) token grid after the patch merger; all images of a split share it."""
    grids = {(int(h) // merge_size, int(w) // merge_size) for _, h, w in grid_thw.tolist()}
    if len(grids) != 1:
        raise CheckpointError(f"images produced different token grids {sorted(grids)}; check features.image_size")
    return grids.pop()


def token_masks(records: list[dict], image_size: int, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tampered fraction per token cell, and whether the record has a mask at all."""
    masks, has_mask = [], []
    for record in records:
        mask = load_mask(record["mask_path"], image_size)
        has_mask.append(mask is not None)
        mask = torch.zeros(image_size, image_size) if mask is None else torch.from_numpy(mask)
        masks.append(torch.nn.functional.adaptive_avg_pool2d(mask[None, None], (grid_h, grid_w))[0, 0])
    return torch.stack(masks), torch.tensor(has_mask, dtype=torch.uint8)


def feature_statistics(features: torch.Tensor, labels: torch.Tensor, grid_h: int, grid_w: int,
                       spectrum_tokens: int) -> dict:
    """Summary statistics and the singular-value spectrum of the (centred) token features."""
    n, t, c = features.shape
    tokens = features.reshape(-1, c)
    generator = torch.Generator().manual_seed(0)
    sample = tokens[torch.randperm(len(tokens), generator=generator)[:spectrum_tokens]]
    singular = torch.linalg.svdvals(sample - sample.mean(0))
    energy = (singular**2).cumsum(0) / (singular**2).sum()
    per_image = torch.linalg.svdvals(features)
    image_energy = ((per_image**2).cumsum(1) / (per_image**2).sum(1, keepdim=True)).mean(0)
    probabilities = singular**2 / (singular**2).sum()
    return {
        "images": n, "tokens_per_image": t, "channels": c, "grid_h": grid_h, "grid_w": grid_w,
        "tampered": int(labels.sum()), "real": int((1 - labels).sum()),
        "mean": float(tokens.mean()), "std": float(tokens.std()),
        "token_norm_mean": float(tokens.norm(dim=1).mean()),
        "channel_std_min": float(tokens.std(0).min()), "channel_std_max": float(tokens.std(0).max()),
        "spectrum": singular.tolist(),
        "energy_cumulative": energy.tolist(),
        "per_image_energy_cumulative": image_energy.tolist(),
        "rank_90": int((energy < 0.90).sum()) + 1,
        "rank_99": int((energy < 0.99).sum()) + 1,
        "effective_rank": float(torch.exp(-(probabilities * probabilities.clamp_min(1e-12).log()).sum())),
    }


def read_feature_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a cached feature file; a missing or unreadable file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file does not exist")
    try:
        return load_tensors(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable feature file ({err})") from None
