"""ΔW export, streaming vs naive: peak memory and time on a synthetic sharded checkpoint pair.

streaming: `lowrank_core.delta` reads one weight pair at a time. naive: `safetensors.torch.load_file` of every shard
of both models, then the same per-module work. With `--svd on` both run the full export (SVD, factors, JSON,
plots) through the same library functions; with `--svd off` both only compute ΔW and its norm, which isolates the
I/O. Each run is a fresh subprocess; its peak RSS is VmHWM (ru_maxrss would include the forking parent's peak),
its growth is the peak minus the RSS after imports. The pair (float32 4096x4096 weights, `--size-gb` per model)
lives in a temporary directory under /tmp and is deleted afterwards. Prints figures, asserts nothing.

    python bench/bench_delta_export.py [--size-gb 2] [--shard-gb 0.5] [--threads 2] [--svd both]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from lowrank_core.delta import (
    Checkpoint,
    DeltaConfig,
    analyse_deltas,
    iter_deltas,
    matched_modules,
    weight_delta,
    write_delta_outputs,
)
from lowrank_core.runtime import peak_rss_mb

SIDE = 4096
PATHS = ("naive", "streaming")


def write_pair(root: Path, size_gb: float, shard_gb: float, seed: int = 0) -> int:
    """Sharded base and teacher checkpoints whose ΔW is rank 16 plus noise; returns the number of weights."""
    count = max(1, round(size_gb * 2 ** 30 / (SIDE * SIDE * 4)))
    per_shard = max(1, round(shard_gb * 2 ** 30 / (SIDE * SIDE * 4)))
    shards = math.ceil(count / per_shard)
    g = torch.Generator().manual_seed(seed)
    for which in ("base", "teacher"):
        (root / which).mkdir()
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        base, teacher = {}, {}
        for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
            name = f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj.weight"
            base[name] = torch.randn(SIDE, SIDE, generator=g) * 0.02
            update = torch.randn(SIDE, 16, generator=g) @ torch.randn(16, SIDE, generator=g) * 1e-4
            teacher[name] = base[name] + update + 1e-4 * torch.randn(SIDE, SIDE, generator=g)
            weight_map[name] = file
        save_file(base, str(root / "base" / file), metadata={"format": "pt"})
        save_file(teacher, str(root / "teacher" / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": count * SIDE * SIDE * 4}, "weight_map": weight_map}
    for which in ("base", "teacher"):
        (root / which / "model.safetensors.index.json").write_text(json.dumps(index))
    return count


def warm_page_cache(root: Path) -> None:
    """Read every file once so that both paths read from the page cache."""
    for path in sorted(root.rglob("*.safetensors")):
        with path.open("rb") as f:
            while f.read(1 << 26):
                pass


def worker(path: str, svd: bool, base_dir: str, teacher_dir: str, out_dir: str, threads: int) -> dict:
    """One run of one path; returns its time and memory figures."""
    torch.set_num_threads(threads)
    cfg = DeltaConfig()
    resident = _vm_rss_mb()
    started = time.perf_counter()
    base, teacher = Checkpoint(base_dir), Checkpoint(teacher_dir)
    shapes = matched_modules(base, teacher, cfg.include)
    if path == "streaming":
        deltas = iter_deltas(base, teacher, shapes)
    else:
        base_tensors, teacher_tensors = {}, {}
        for ckpt, tensors in ((base, base_tensors), (teacher, teacher_tensors)):
            for file in sorted(set(ckpt.files.values())):
                tensors.update(load_file(str(file)))
        deltas = ((name, *weight_delta(base_tensors[base.keys[name + ".weight"]],
                                       teacher_tensors[teacher.keys[name + ".weight"]])) for name in shapes)
    if svd:
        analysis = analyse_deltas(deltas, shapes, cfg)
        write_delta_outputs(analysis, out_dir, cfg, {"base_dir": base_dir, "teacher_dir": teacher_dir}, started)
    else:
        for _name, delta, _base_norm in deltas:
            torch.linalg.vector_norm(delta)
            del delta
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": peak, "growth_mb": peak - resident}


def _vm_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run_worker(path: str, svd: bool, root: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", path, "--svd", "on" if svd else "off", "--threads", str(threads),
               "--root", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each model (GiB)")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="shard size (GiB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--svd", choices=("on", "off", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1, help="runs per path, alternating; the fastest is shown")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root = Path(args.root)
        figures = worker(args.worker, args.svd == "on", str(root / "base"), str(root / "teacher"),
                         str(root / f"out_{args.worker}_{args.svd}"), args.threads)
        print(json.dumps(figures))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_delta_", dir="/tmp"))
    try:
        started = time.perf_counter()
        count = write_pair(root, args.size_gb, args.shard_gb)
        warm_page_cache(root)
        size_gib = count * SIDE * SIDE * 4 / 2 ** 30
        print(f"synthetic pair: {count} float32 weights of {SIDE}x{SIDE} = {size_gib:.2f} GiB per model "
              f"(written in {time.perf_counter() - started:.0f} s), {args.threads} threads")
        rows = []
        for svd in {"on": [True], "off": [False], "both": [False, True]}[args.svd]:
            runs = {path: [] for path in PATHS}
            for _ in range(args.repeats):
                for path in PATHS:
                    runs[path].append(run_worker(path, svd, root, args.threads))
            naive, streaming = (min(runs[path], key=lambda run: run["seconds"]) for path in PATHS)
            rows.append({
                "svd": "on" if svd else "off",
                "naive_s": naive["seconds"], "stream_s": streaming["seconds"],
                "time_ratio": streaming["seconds"] / naive["seconds"],
                "naive_peak_mb": naive["peak_rss_mb"], "stream_peak_mb": streaming["peak_rss_mb"],
                "naive_growth_mb": naive["growth_mb"], "stream_growth_mb": streaming["growth_mb"],
                "growth_ratio": streaming["growth_mb"] / naive["growth_mb"],
            })
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}"))
        print("ratios are streaming / naive; growth = peak RSS minus RSS after imports "
              "(target: growth ratio <= 0.1, time ratio <= 1)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
