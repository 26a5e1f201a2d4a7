"""LoRA training throughput: this project's `train_loop` against a plain PEFT + transformers `Trainer`, same arm.

    python bench/bench_lora_trainer.py [--steps 40] [--batch-size 4] [--repeats 3] [--threads 2]

Builds the tiny Qwen2.5-VL and a synthetic dataset in a temporary directory, then trains one LoRA arm (objective
`lm`, init random, preset `standard` at r 4 / alpha 8, strategy `later_half`, image size 64) with each runner,
alternately, `--repeats` times. Both get a freshly built student (model loading is not timed), the same batches
from the vision-language modality's batcher (the Trainer's collate drops the keys the model does not take), the same batch size, number of
optimizer steps, AdamW (`adamw_torch`; TrainConfig's weight decay 0.01 and grad-norm clip 1.0), lr 2e-4 with
TrainConfig's 3 warm-up steps then cosine, fp32 on CPU and torch thread count. With the same seed both see the
batches in the same order, so their losses should agree closely. Timed: the wall time of `train_loop(...)` /
`trainer.train()`. Both evaluate once, on the same validation records, after the last step (`train_loop` always
does); `train_loop` also writes its one checkpoint then (checkpoint_every = steps, so no intermediate ones), the
Trainer saves nothing. samples/s = steps × batch / seconds, median over the repeats (each run is printed too: on a
shared machine they scatter); the final loss is the last step's training loss of the median run. A benchmark: it
prints figures and asserts nothing.
"""

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from lowrank_core.data import DatasetConfig, SyntheticSpec, generate_synthetic, prepare_dataset
from lowrank_core.grid import PRESETS, STRATEGIES
from lowrank_core.io import read_json
from lowrank_core.lora import ArmConfig, build_student, student_loss
from lowrank_core.modalities.vision_language import BATCH_EXTRAS, MODALITY
from lowrank_core.modeling import TinyModelSpec, build_tiny_model
from lowrank_core.training import Batches, train_loop

LR = 2e-4


def run_ours(model: dict, arm: ArmConfig, splits: dict, work: Path) -> tuple[float, float]:
    """Seconds of `train_loop` and its final training loss (`model`: the model.json description)."""
    student, _, processor = build_student(model, arm)
    collate = MODALITY.batcher(processor, arm)
    cfg = arm.train
    train = Batches(splits["train"]["records"], cfg.batch_size, collate, seed=arm.seed, drop_last=True)
    val = Batches(splits["val"]["records"], cfg.batch_size, collate)
    start = time.perf_counter()
    result = train_loop(student, student_loss, train, val, cfg, work / "state", work / "tb")
    return time.perf_counter() - start, result.history[-1]["loss"]


def run_trainer(model: dict, arm: ArmConfig, splits: dict, work: Path) -> tuple[float, float]:
    """Seconds of `trainer.train()` on the PEFT model and its final training loss."""
    student, _, processor = build_student(model, arm)
    collate = MODALITY.batcher(processor, arm)
    cfg = arm.train
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        optim="adamw_torch", weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=1,
        eval_strategy="steps", eval_steps=cfg.max_steps, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, dataloader_drop_last=True, remove_unused_columns=False, label_names=["labels"],
        seed=arm.seed)
    trainer = Trainer(model=student.model, args=args, train_dataset=splits["train"]["records"],
                      eval_dataset=splits["val"]["records"], data_collator=lambda records: {
                          k: v for k, v in collate(records).items() if k not in BATCH_EXTRAS})
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return seconds, [row["loss"] for row in trainer.state.log_history if "loss" in row][-1]


RUNNERS = {"Trainer": run_trainer, "train_loop": run_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    arm = ArmConfig.from_dict({
        "objective": "lm", "init": "random", "seed": 0, "image_size": 64,
        "preset": {**PRESETS["standard"], "r": 4, "alpha": 8}, "strategy": STRATEGIES["later_half"],
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": LR, "mixed_precision": "no",
                  "eval_every": args.steps, "checkpoint_every": args.steps},
    })
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = str(build_tiny_model(root / "tiny", TinyModelSpec()))
        generate_synthetic(root / "data", SyntheticSpec(train=args.steps * args.batch_size, val=args.batch_size,
                                                        test=1))
        prepare_dataset(DatasetConfig.from_dict({}), root / "data", root / "manifest.json")
        splits = read_json(root / "manifest.json")["splits"]
        model = {"path": model_path, "dtype": "float32", "modality": "vision_language"}
        runs = {name: [] for name in RUNNERS}
        for repeat in range(args.repeats):
            for name, runner in RUNNERS.items():
                runs[name].append(runner(model, arm, splits, root / f"{name}_{repeat}"))
    samples = args.steps * args.batch_size
    rows = {}
    for name, results in runs.items():
        seconds, loss = sorted(results)[len(results) // 2]
        rows[name] = (samples / seconds, loss, [samples / s for s, _ in results])
    baseline = rows["Trainer"][0]
    print(f"arm lm / standard r4 a8 / random / later_half, {args.steps} steps x batch {args.batch_size}, "
          f"{args.threads} threads, median of {args.repeats}\n")
    print("| runner | samples/s (median) | ratio vs Trainer | final loss | samples/s (each run) |")
    print("|---|---|---|---|---|")
    for name, (rate, loss, each) in rows.items():
        print(f"| {name} | {rate:.2f} | {rate / baseline:.3f} | {loss:.4f} | {', '.join(f'{r:.2f}' for r in each)} |")


if __name__ == "__main__":
    main()
