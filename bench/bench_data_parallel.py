"""Teacher training throughput: N data-parallel CPU processes (gloo) against one process, same global batch.

    python bench/bench_data_parallel.py [--steps 20] [--processes 2] [--batch-size 8]

Builds the tiny model and a synthetic dataset in a temporary directory, trains the teacher once per process count
and prints samples/s (median over steps, from history.csv) and the wall time, with ratios to the 1-process,
1-thread run: 1 process x 1 thread, 1 process x N threads, N processes x 1 thread (the same cores as the second),
replicated (DDP) and sharded (`sharding: fsdp`, FSDP2).
A benchmark: it prints figures and asserts nothing.
"""

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lowrank_core.data import DatasetConfig, SyntheticSpec, generate_synthetic, prepare_dataset
from lowrank_core.modeling import ModelConfig, TinyModelSpec, build_tiny_model, prepare_model

RUN = """
import torch; torch.set_num_threads({threads})
from lowrank_core.distributed import launch
from lowrank_core.lora import ArmConfig
from lowrank_core.teacher import train_teacher
from lowrank_core.training import TrainConfig
cfg = TrainConfig.from_dict({{"max_steps": {steps}, "batch_size": {batch}, "lr": 1e-3, "eval_every": {steps},
                             "checkpoint_every": {steps}, "sharding": {sharding!r}}})
launch(train_teacher, {model!r}, {manifest!r}, cfg, ArmConfig(image_size=64), {out!r}, {out!r} + "_state", {out!r} + "_tb",
       processes={processes})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_model(root / "tiny", TinyModelSpec())
        prepare_model(ModelConfig.from_dict({}), root / "tiny", root / "model.json")
        generate_synthetic(root / "data", SyntheticSpec(train=160, val=8, test=2))
        prepare_dataset(DatasetConfig.from_dict({}), root / "data", root / "manifest.json")
        rows = []
        for processes, threads, sharding in ((1, 1, "none"), (1, args.processes, "none"), (args.processes, 1, "none"),
                                             (args.processes, 1, "fsdp")):
            out = str(root / f"teacher_{processes}x{threads}_{sharding}")
            code = RUN.format(steps=args.steps, batch=args.batch_size, model=str(root / "model.json"),
                              manifest=str(root / "manifest.json"), out=out, processes=processes, threads=threads,
                              sharding=sharding)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            wall = time.perf_counter() - start
            history = pd.read_csv(Path(out) / "history.csv")
            rows.append({"processes": processes, "threads": threads, "sharding": sharding,
                         "samples_per_s": history["samples_per_s"].median(), "wall_s": wall,
                         "final_loss": history["loss"].iloc[-1]})
    table = pd.DataFrame(rows)
    table["throughput_vs_1"] = table["samples_per_s"] / table["samples_per_s"].iloc[0]
    table["wall_vs_1"] = table["wall_s"] / table["wall_s"].iloc[0]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
