"""Feature-extraction throughput on the tiny default: images/s per batch size, against batch size 1.

    python bench/bench_features.py [--images 160] [--threads 2]

Builds the tiny model and a synthetic split in a temporary directory, extracts features with each batch size and
prints a table with the ratio to the batch-size-1 baseline. A benchmark: it prints figures and asserts nothing.
"""

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lowrank_core.data import SyntheticSpec, generate_synthetic, prepare_dataset, DatasetConfig
from lowrank_core.features import FeatureConfig, extract_features
from lowrank_core.modeling import ModelConfig, TinyModelSpec, build_tiny_model, prepare_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_model(root / "tiny", TinyModelSpec())
        prepare_model(ModelConfig.from_dict({}), root / "tiny", root / "model.json")
        generate_synthetic(root / "data", SyntheticSpec(train=args.images, val=2, test=2))
        prepare_dataset(DatasetConfig.from_dict({}), root / "data", root / "manifest.json")
        rows = []
        for batch_size in args.batch_sizes:
            cfg = FeatureConfig.from_dict({"batch_size": batch_size})
            start = time.perf_counter()
            extract_features(root / "model.json", root / "manifest.json", "train", cfg, "float32",
                             root / "features.safetensors", root / "stats.json")
            rows.append((batch_size, args.images / (time.perf_counter() - start)))
    baseline = rows[0][1]
    print(f"feature extraction, tiny default, {args.images} images of 64x64, {args.threads} threads")
    print(f"{'batch size':>10} {'images/s':>10} {'vs batch 1':>11}")
    for batch_size, rate in rows:
        print(f"{batch_size:>10} {rate:>10.1f} {rate / baseline:>10.2f}x")


if __name__ == "__main__":
    main()
