"""ΔW export side by side with mergekit's `mergekit-extract-lora`: time, peak memory, factor accuracy.

A synthetic base / fine-tune pair shaped like SmolLM-135M (Llama: hidden 576, MLP 1536, 9 heads, 3 KV heads, vocabulary
49152, float32, tied embeddings; `--layers` decoder layers, 30 in the real model), whose every ΔW has a realistic,
slowly decaying spectrum: U diag(i^-0.5) Vᵀ (random orthonormal U, V) plus Gaussian noise, ‖ΔW‖_F ≈ 1% of ‖W‖_F.
Each tool runs in a fresh subprocess on the same pair, modules (every linear weight of the decoder layers, embeddings
excluded) and thread count, and writes everything it writes in normal use:

- ours: `lowrank_core.delta.export_delta` at the default `DeltaConfig`: for every module the checked top-64 SVD
  (Gram eigenvectors + Rayleigh–Ritz, a-posteriori error ≤ 1e-3 or the exact SVD), factors at ranks 4, 8, 16, 32
  and 64 (five safetensors files), `svd_analysis.json` (spectra, energies, per-module and per-rank factor errors,
  groups), `svd_summary.txt` and both plots: the whole export, plots included;
- mergekit: `mergekit-extract-lora --max-rank 64` on the CPU (one `adapter_model.safetensors` with rank-64 factors
  from a full float32 SVD of each module, whose first r columns / rows are its rank-r factors, the PEFT
  `adapter_config.json` and a README).

`wall_s` is the whole process, interpreter and imports included, as a user timing either command sees it; `cpu_s` its
user + system CPU time (steadier than wall time on a shared machine); `call_s` the export call alone (it flatters
mergekit, whose module import already loads transformers' modelling stack); `peak_rss_mb` the process's peak RSS
(VmHWM), the figure the memory target is on, and `baseline_import_mb` its RSS right after `import torch`, before
anything else: the share of the peak neither tool can go below. The error of a tool at rank r on a module is
‖B A · scaling − ΔW_r‖_F / ‖ΔW_r‖_F against the exact ΔW_r of `numpy.linalg.svd` in float64; the table shows its
maximum over modules and ranks, and ours also the largest error its `svd_analysis.json` recorded. Then the
decomposition alone, per module on the same ΔW in this process: ours (`accurate_triplets`: Gram eigenvectors,
Rayleigh–Ritz, the a-posteriori check) against mergekit's `TaskVectorDecompositionTask` (a full float32 SVD). Ratios
are ours / mergekit; the targets (issue 17) are wall_s ≤ 0.5 and peak_rss_mb ≤ 0.3. Each tool runs `--repeats`
times, alternating; the table shows the median of each figure over its runs, and every run's wall time and peak are
listed under it. Without mergekit (`pip install -e .[bench]`) only ours runs. Prints figures, asserts nothing.

    python bench/bench_delta_vs_mergekit.py [--layers 30] [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

from lowrank_core.delta import DeltaConfig, accurate_triplets, lora_factors, weight_delta

RANKS = (4, 8, 16, 32, 64)
HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 576, 1536, 9, 3, 49152
SHAPES = {  # module -> [out, in], as in SmolLM-135M
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP),
}
TOOLS = ("ours", "mergekit")


def slow_decay_delta(m: int, n: int, weight_norm: float, g: torch.Generator) -> torch.Tensor:
    """U diag(i^-0.5) Vᵀ plus Gaussian noise (a bulk near 0.1-0.2 σ_1), scaled to ‖ΔW‖_F ≈ 1% of `weight_norm`."""
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
    delta = (U * torch.arange(1, p + 1) ** -0.5) @ V.T + 0.1 * torch.randn(m, n, generator=g) / n ** 0.5
    return delta * (0.01 * weight_norm / torch.linalg.norm(delta))


def write_pair(root: Path, layers: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Base and teacher checkpoints (config.json + model.safetensors); returns module name -> shape."""
    g = torch.Generator().manual_seed(seed)
    base = {"model.embed_tokens.weight": 0.02 * torch.randn(VOCAB, HIDDEN, generator=g),
            "model.norm.weight": torch.ones(HIDDEN)}
    teacher = dict(base)
    modules = {}
    for layer in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            base[f"model.layers.{layer}.{norm}.weight"] = teacher[f"model.layers.{layer}.{norm}.weight"] = \
                torch.ones(HIDDEN)
        for module, shape in SHAPES.items():
            name = f"model.layers.{layer}.{module}"
            weight = 0.02 * torch.randn(shape, generator=g)
            base[f"{name}.weight"] = weight
            teacher[f"{name}.weight"] = weight + slow_decay_delta(*shape, float(torch.linalg.norm(weight)), g)
            modules[name] = shape
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}
    for which, tensors in (("base", base), ("teacher", teacher)):
        (root / which).mkdir()
        save_file(tensors, str(root / which / "model.safetensors"), metadata={"format": "pt"})
        (root / which / "config.json").write_text(json.dumps(config))
    return modules


WORKER = textwrap.dedent("""
    import json, re, shutil, sys, time
    import torch

    def status_mb(field):  # VmRSS: resident now; VmHWM: this process's peak
        with open("/proc/self/status") as status:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", status.read(), re.M).group(1)) / 1024

    baseline_mb = status_mb("VmRSS")
    tool, root, threads, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    torch.set_num_threads(threads)
    base, teacher, out = f"{root}/base", f"{root}/teacher", f"{root}/out_{tool}"
    shutil.rmtree(out, ignore_errors=True)
    if tool == "ours":
        from lowrank_core.delta import DeltaConfig, export_delta
        run = lambda: export_delta(base, teacher, out, DeltaConfig(ranks=tuple(ranks)))
    else:
        from mergekit.scripts.extract_lora import main
        run = lambda: main.main(["--model", teacher, "--base-model", base, "--out-path", out, "--max-rank",
                                 str(max(ranks)), "--exclude-regex", "embed_tokens|lm_head", "--device", "cpu",
                                 "--num-threads", str(threads)], standalone_mode=False)
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(json.dumps({"call_s": seconds, "peak_rss_mb": status_mb("VmHWM"), "baseline_import_mb": baseline_mb}))
""")


def run_worker(tool: str, root: Path, threads: int) -> dict:
    """One export by `tool` in a fresh interpreter that imports only that tool, timed from its start to its exit."""
    command = [sys.executable, "-c", WORKER, tool, str(root), str(threads), json.dumps(RANKS)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{tool} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, **json.loads(done.stdout.strip().splitlines()[-1])}


def tool_factors(tool: str, root: Path, name: str, rank: int) -> torch.Tensor:
    """The rank-`rank` ΔW of module `name` that `tool` exported (B @ A times the LoRA scaling), in float64."""
    if tool == "ours":
        path, prefix = root / "out_ours" / f"factors_r{rank}.safetensors", name
        suffix = ""
    else:
        path, prefix = root / "out_mergekit" / "adapter_model.safetensors", f"base_model.model.{name}"
        suffix = ".weight"
    with safe_open(str(path), "pt") as f:
        B, A = (f.get_tensor(f"{prefix}.lora_{side}{suffix}").double() for side in "BA")
        scaling = float(json.loads((f.metadata() or {}).get("scaling", "1")))
    return B[:, :rank] @ A[:rank] * scaling


def mergekit_decomposition(root: Path):
    """mergekit's own per-module decomposition (`TaskVectorDecompositionTask.execute`) as a function of ΔW."""
    from mergekit.architecture import WeightInfo
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoadTensor
    from mergekit.scripts.extract_lora import TaskVectorDecompositionTask, TaskVectorTask

    load = LoadTensor(model=ModelReference.model_validate(str(root / "base")), tensor="unused")
    task = TaskVectorDecompositionTask(weight_info=WeightInfo(name="unused"), max_rank=max(RANKS),
                                       input_task=TaskVectorTask(base_tensor=load, model_tensor=load))
    return lambda delta: task.execute(task_vector=delta)


def decomposition_seconds(root: Path, modules: dict, tools: list[str], threads: int) -> dict[str, float]:
    """Seconds each tool's decomposition of every module's ΔW takes, reading and subtracting excluded: ours from the
    exact float64 ΔW to checked rank-64 factors, mergekit's from the float32 difference it computes."""
    cfg = DeltaConfig(ranks=RANKS)
    decompose = {"ours": lambda delta64, _: lora_factors(*accurate_triplets(delta64, max(RANKS), cfg)[:3],
                                                          max(RANKS), 1.0)}
    if "mergekit" in tools:
        mergekit = mergekit_decomposition(root)
        decompose["mergekit"] = lambda _, delta32: mergekit(delta32)
    seconds = dict.fromkeys(decompose, 0.0)
    with threadpool_limits(threads, user_api="blas"), safe_open(str(root / "base" / "model.safetensors"), "pt") as fb, \
            safe_open(str(root / "teacher" / "model.safetensors"), "pt") as ft:
        for name in modules:
            base, teacher = fb.get_tensor(name + ".weight"), ft.get_tensor(name + ".weight")
            delta64, delta32 = weight_delta(base, teacher)[0], teacher - base
            for tool, run in decompose.items():
                started = time.perf_counter()
                run(delta64, delta32)
                seconds[tool] += time.perf_counter() - started
    return seconds


def max_errors(root: Path, modules: dict, tools: list[str]) -> dict[str, float]:
    """Max over modules and ranks of each tool's relative error against numpy's exact ΔW_r (float64)."""
    worst = dict.fromkeys(tools, 0.0)
    with safe_open(str(root / "base" / "model.safetensors"), "pt") as fb, \
            safe_open(str(root / "teacher" / "model.safetensors"), "pt") as ft:
        for name in modules:
            delta = (ft.get_tensor(name + ".weight").double() - fb.get_tensor(name + ".weight").double()).numpy()
            U, S, Vh = np.linalg.svd(delta, full_matrices=False)
            for rank in RANKS:
                exact = (U[:, :rank] * S[:rank]) @ Vh[:rank]
                for tool in tools:
                    error = np.linalg.norm(tool_factors(tool, root, name, rank).numpy() - exact) / np.linalg.norm(exact)
                    worst[tool] = max(worst[tool], float(error))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30: the SmolLM-135M shape)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, alternating; medians are shown")
    args = parser.parse_args()
    tools = list(TOOLS)
    try:
        import mergekit.scripts.extract_lora  # noqa: F401
    except ImportError as err:
        print(f"mergekit is not importable ({err}); install the bench extra (pip install -e .[bench]). "
              "Running ours only.")
        tools = ["ours"]
    root = Path(tempfile.mkdtemp(prefix="bench_delta_mergekit_", dir="/tmp"))
    try:
        started = time.perf_counter()
        modules = write_pair(root, args.layers)
        params = sum(m * n for m, n in modules.values())
        print(f"synthetic pair: {len(modules)} modules ({args.layers} layers of {', '.join(map(str, SHAPES.values()))}"
              f"), {params / 1e6:.0f}M ΔW parameters, float32, written in {time.perf_counter() - started:.0f} s; "
              f"{args.threads} thread(s)")
        runs = {tool: [] for tool in tools}
        for _ in range(args.repeats):
            for tool in tools:
                runs[tool].append(run_worker(tool, root, args.threads))
        median = {tool: pd.DataFrame(runs[tool]).median().to_dict() for tool in tools}
        errors = max_errors(root, modules, tools)
        torch.set_num_threads(args.threads)
        decomposition = decomposition_seconds(root, modules, tools, args.threads)
        rows = [{"tool": tool, **median[tool], "max_rel_error": errors[tool], "decomposition_s": decomposition[tool]}
                for tool in tools]
        if "mergekit" in tools:
            rows.append({"tool": "ours / mergekit", **{key: rows[0][key] / rows[1][key] for key in rows[0]
                                                        if key != "tool"}})
        print(pd.DataFrame(rows).to_string(index=False, formatters={
            "wall_s": "{:.2f}".format, "cpu_s": "{:.2f}".format, "call_s": "{:.2f}".format,
            "peak_rss_mb": "{:.3g}".format, "baseline_import_mb": "{:.3g}".format, "max_rel_error": "{:.2e}".format,
            "decomposition_s": "{:.2f}".format}))
        for tool in tools:
            walls = ", ".join(f"{run['wall_s']:.2f}" for run in runs[tool])
            peaks = ", ".join(f"{run['peak_rss_mb']:.0f}" for run in runs[tool])
            print(f"{tool}, every run: wall_s {walls}; peak_rss_mb {peaks}")
        recorded = json.loads((root / "out_ours" / "svd_analysis.json").read_text())
        methods = pd.Series([m["method"] for m in recorded["modules"]]).value_counts().to_dict()
        print(f"ours: SVD per module {methods}, {sum(m['fallback'] for m in recorded['modules'])} exact fallbacks; "
              f"largest recorded (a-posteriori) factor error {recorded['factor_rel_error_max']:.2e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
