"""ΔW = W_teacher − W_base: how low-rank a full fine-tune is, and LoRA-ready SVD factors of it.

`export_delta` streams both checkpoints tensor by tensor (each tensor is memory-mapped, read and released before
the next, so a 7B pair needs about one weight pair of RAM, not two models), and for every targeted linear weight:

- computes ‖ΔW‖_F and its top-k singular triplets, k = the largest configured rank (clipped to min(shape)):
  a randomized SVD (`torch.svd_lowrank`, Halko et al.) with oversampling and power iterations, or an exact SVD
  with the full spectrum when min(shape) <= `full_spectrum_threshold`;
- reports, per configured rank r, the energy captured Σσ²_{≤r} / ‖ΔW‖²_F and the relative reconstruction error
  ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(1 − energy). Both are exact for the exported factors (the randomized triplets
  satisfy U_rᵀ ΔW V_r = diag(σ_r)); for the randomized SVD they are bounds on the optimal rank-r values;
- pools modules into groups (tower: vision / merger / language / lm_head; kind: attention / mlp / other; their
  product; and tower × layer depth), where a group's energy is Σ captured / Σ ‖ΔW‖²_F over its modules.

Module names are the names of the model's `nn.Linear` modules: checkpoints saved in a legacy layout (transformers
writes Qwen2.5-VL as `visual.*` / `model.layers.*`) are renamed with transformers' own conversion mapping for the
`architectures` in `config.json` (`model.visual.*` / `model.language_model.layers.*`), so the include regex and the
factor keys use the names a PEFT student sees.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
import torch
import transformers
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import Section, require
from .errors import CheckpointError, ConfigError
from .io import atomic_path, read_json, save_tensors, write_json
from .runtime import peak_rss_mb

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_INCLUDE = (r"^(?:model\.visual\.(?:blocks\.\d+|merger|deepstack_merger_list\.\d+)\."
                   r"|model\.(?:language_model\.)?layers\.\d+\.|lm_head$)")
FACTOR_CONVENTION = ("lora_B @ lora_A * scaling == ΔW_r; lora_B = U_r·diag(sqrt(σ_r / scaling)), "
                     "lora_A = diag(sqrt(σ_r / scaling))·V_rᵀ; rank-deficient modules are zero-padded to r")


@dataclasses.dataclass(frozen=True)
class DeltaConfig(Section):
    """What the ΔW export analyses and how.

    `ranks` are the LoRA ranks analysed and exported (`factors_r{r}.safetensors` each); `include` is a regex searched
    in module names (2-D `.weight` tensors only; embeddings never); the randomized SVD uses `oversampling` extra
    columns and `power_iterations`; modules with min(shape) <= `full_spectrum_threshold` get an exact SVD and their
    full spectrum. `alpha` is the LoRA alpha of the students the factors are for: the factors satisfy
    B @ A * alpha / r == ΔW_r; None means alpha = r (scaling 1, B @ A == ΔW_r). `seed` seeds the random projections.
    """

    key = "delta"
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    include: str = DEFAULT_INCLUDE
    oversampling: int = 10
    power_iterations: int = 4
    full_spectrum_threshold: int = 512
    alpha: float | None = None
    seed: int = 0

    def check(self, key: str) -> None:
        require(len(self.ranks) > 0, key, "ranks", "must list at least one rank")
        require(all(r >= 1 for r in self.ranks), key, "ranks", "every rank must be at least 1")
        require(len(set(self.ranks)) == len(self.ranks), key, "ranks", "must not repeat a rank")
        try:
            re.compile(self.include)
        except re.error as err:
            raise ConfigError(f"{key}.include: not a valid regular expression ({err})") from None
        require(self.oversampling >= 0, key, "oversampling", "must be at least 0")
        require(self.power_iterations >= 0, key, "power_iterations", "must be at least 0")
        require(self.full_spectrum_threshold >= 0, key, "full_spectrum_threshold", "must be at least 0")
        require(self.alpha is None or self.alpha > 0, key, "alpha", "must be positive")

    def scaling(self, rank: int) -> float:
        """LoRA scaling alpha / r of a rank-`rank` student (1 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / rank


class Checkpoint:
    """A `save_pretrained` directory (one `model.safetensors` or a sharded index) read one tensor at a time.

    `keys` maps parameter names (module naming, see the module docstring) to checkpoint keys; `files` and
    `shapes` map checkpoint keys to their safetensors file and shape, read from the headers only.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        if single.is_file():
            self.source = single
            self.files = {key: single for key in self._header(single)}
        elif index.is_file():
            self.source = index
            try:
                weight_map = read_json(index).get("weight_map")
            except (ValueError, AttributeError):
                weight_map = None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' mapping")
            self.files = {key: self.directory / shard for key, shard in weight_map.items()}
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.shapes: dict[str, list[int]] = {}
        for path in sorted(set(self.files.values())):
            header = self._header(path)
            for key in (k for k, p in self.files.items() if p == path):
                if key not in header:
                    raise CheckpointError(f"{self.source}: {key} is listed in {path.name} but not stored there")
                self.shapes[key] = header[key]
        rename = _module_renamer(self.directory)
        self.keys = {rename(key): key for key in self.files}

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor of parameter `name`, memory-mapped; its pages are released when the tensor is freed."""
        key = self.keys[name]
        try:
            with safe_open(str(self.files[key]), framework="pt") as f:
                return f.get_tensor(key)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{self.files[key]}: cannot read {key} ({err})") from None

    def _header(self, path: Path) -> dict[str, list[int]]:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file is missing (listed in {self.source})")
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _module_renamer(directory: Path):
    """Checkpoint key -> parameter name, with transformers' conversion mapping for the checkpoint's model (built on
    the meta device from its config: the mapping covers its sub-models, e.g. a depth model's DINOv2 backbone)."""
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    model_class = getattr(transformers, next(iter(config.get("architectures") or []), ""), None)
    if model_class is None:
        return lambda key: key
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    with torch.device("meta"):
        model = model_class(transformers.AutoConfig.from_pretrained(directory))
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, [])[0]


def matched_modules(base: Checkpoint, teacher: Checkpoint, include: str) -> dict[str, list[int]]:
    """Name -> 2-D weight shape [out, in] of the linear and convolution modules (a kernel [out, in, k, k] taken as
    [out, in·k·k], the shape of PEFT's convolution LoRA product) both checkpoints share that `include` selects, in
    natural order.

    Raises CheckpointError when a selected weight exists in one checkpoint only or with different shapes.
    """
    pattern = re.compile(include)

    def selected(ckpt: Checkpoint) -> set[str]:
        return {n.removesuffix(".weight") for n in ckpt.keys if n.endswith(".weight")
                and "embed" not in n and pattern.search(n.removesuffix(".weight"))}

    in_base, in_teacher = selected(base), selected(teacher)
    for name in sorted(in_base ^ in_teacher):
        has, lacks = (base, teacher) if name in in_base else (teacher, base)
        key = has.keys[name + ".weight"]
        raise CheckpointError(f"{key}: in {has.files[key]} but not in {lacks.source} (different architectures?)")
    shapes = {}
    for name in sorted(in_base, key=_natural_key):
        base_key, teacher_key = base.keys[name + ".weight"], teacher.keys[name + ".weight"]
        base_shape, teacher_shape = base.shapes[base_key], teacher.shapes[teacher_key]
        if base_shape != teacher_shape:
            raise CheckpointError(f"{base_key}: shape {base_shape} in {base.files[base_key]} but {teacher_shape} "
                                  f"in {teacher.files[teacher_key]}")
        if len(base_shape) in (2, 4):  # a linear layer, or a convolution's [out, in, k, k] as [out, in·k·k]
            shapes[name] = [base_shape[0], math.prod(base_shape[1:])]
    if not shapes:
        raise ConfigError(f"delta.include: no linear weight of {base.source} matches {include!r}")
    return shapes


def weight_delta(base_weight: torch.Tensor, teacher_weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(ΔW in float32, ‖W_base‖_F); never writes into the (possibly memory-mapped) inputs."""
    delta = teacher_weight.to(torch.float32, copy=True).sub_(base_weight)
    return delta, float(torch.linalg.vector_norm(base_weight, dtype=torch.float32))


def iter_deltas(base: Checkpoint, teacher: Checkpoint, names: Iterable[str]
                ) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(module name, ΔW, ‖W_base‖_F) per module, holding one weight pair at a time."""
    for name in names:
        delta, base_norm = weight_delta(base.tensor(name + ".weight"), teacher.tensor(name + ".weight"))
        yield name, delta.flatten(1), base_norm


def top_singular_triplets(matrix: torch.Tensor, k: int, cfg: DeltaConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Top-k (U [m, k], σ [k], Vᵀ [k, n]), the singular values known (all when exact) and the method used."""
    if min(matrix.shape) <= cfg.full_spectrum_threshold or k + cfg.oversampling >= min(matrix.shape):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k], S, "exact"
    with torch.random.fork_rng(devices=[]):  # seeds the CPU generator only, and restores it afterwards
        torch.default_generator.manual_seed(cfg.seed)
        U, S, V = torch.svd_lowrank(matrix, q=k + cfg.oversampling, niter=cfg.power_iterations)
    return U[:, :k], S[:k], V[:, :k].mT, S[:k], "randomized"


def lora_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scaling: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B [out, rank], A [rank, in]) with B @ A * scaling == U_r diag(σ_r) Vᵀ_r = ΔW_r.

    sqrt(σ / scaling) goes to both sides, so B and A have equal column / row norms (as in PiSSA). Where fewer
    than `rank` triplets exist (rank > min(shape)), the missing columns of B and rows of A are zero.
    """
    r = min(rank, S.numel())
    root = (S[:r] / scaling).sqrt()
    B = U.new_zeros(U.shape[0], rank)
    A = Vh.new_zeros(rank, Vh.shape[1])
    B[:, :r] = U[:, :r] * root
    A[:r] = root[:, None] * Vh[:r]
    return B, A


@dataclasses.dataclass
class DeltaAnalysis:
    """Per-module records (JSON-ready) and the top-k triplets (U, σ, Vᵀ) of every module."""

    modules: list[dict]
    triplets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def analyse_deltas(deltas: Iterable[tuple[str, torch.Tensor, float]], shapes: dict[str, list[int]],
                   cfg: DeltaConfig) -> DeltaAnalysis:
    """Spectrum, energy and error per rank of every (name, ΔW, ‖W_base‖_F) in `deltas`.

    `shapes` (name -> [out, in] of every module in `deltas`) lets the kept triplets be allocated up front:
    allocated one by one between ΔW-sized temporaries, they would fragment the heap and grow RSS per module.
    """
    ranks = sorted(cfg.ranks)
    ks = {name: min(ranks[-1], *shape) for name, shape in shapes.items()}
    analysis = DeltaAnalysis([], {name: (torch.empty(out, ks[name]), torch.empty(ks[name]), torch.empty(ks[name], in_))
                                  for name, (out, in_) in shapes.items()})
    progress = tqdm(total=len(shapes), desc="ΔW SVD", unit="module")  # wrapping `deltas` would hold the last ΔW
    for name, delta, base_norm in deltas:
        k = ks[name]
        U, S, Vh, spectrum, method = top_singular_triplets(delta, k, cfg)
        norm = float(torch.linalg.vector_norm(delta))
        captured = torch.cumsum(S.double() ** 2, 0)
        energy = {r: min(1.0, float(captured[min(r, k) - 1]) / norm ** 2) if norm > 0 else None for r in ranks}
        analysis.modules.append({
            "name": name,
            "shape": list(delta.shape),
            "parameters": delta.numel(),
            **module_group(name),
            "frobenius_norm": norm,
            "base_norm": base_norm,
            "relative_change": norm / base_norm if base_norm > 0 else None,
            "method": method,
            "singular_values": spectrum.tolist(),
            "energy": {str(r): e for r, e in energy.items()},
            "rel_error": {str(r): None if e is None else math.sqrt(1.0 - e) for r, e in energy.items()},
        })
        for kept, value in zip(analysis.triplets[name], (U, S, Vh)):
            kept.copy_(value)
        del delta, U, Vh  # free this module's ΔW before the iterator loads the next pair
        progress.update()
    progress.close()
    return analysis


def module_group(name: str) -> dict:
    """`tower` (vision / merger / language / lm_head for a (vision-)language model; a depth model's first name
    part: backbone / neck / head, aggregator / depth_head / camera_head), `kind` (attention / mlp / other) and
    `layer` (int or None)."""
    if name.startswith("lm_head") or name.endswith("lm_head"):
        tower = "lm_head"
    elif re.search(r"(?:^|\.)visual\.(?:merger|deepstack_merger)", name):
        tower = "merger"
    elif re.search(r"(?:^|\.)(?:visual|vision\w*)\.", name):
        tower = "vision"
    elif re.match(r"(?:model\.)?(?:language_model\.)?layers\.", name):
        tower = "language"
    else:
        tower = name.split(".", 1)[0]
    kind = ("attention" if re.search(r"attn|attention", name)
            else "mlp" if re.search(r"mlp|ffn|feed_forward|experts", name) else "other")
    layer = re.search(r"\.(?:blocks|layers|layer|frame_blocks|global_blocks)\.(\d+)\.", name)
    return {"tower": tower, "kind": kind, "layer": int(layer.group(1)) if layer else None}


def summarise_groups(modules: list[dict], ranks: list[int]) -> dict:
    """Pooled statistics of all modules, per tower, kind, tower/kind and tower/layer."""
    groupings = {
        "all": lambda m: "all",
        "by_tower": lambda m: m["tower"],
        "by_kind": lambda m: m["kind"],
        "by_tower_kind": lambda m: f"{m['tower']}/{m['kind']}",
        "by_layer": lambda m: None if m["layer"] is None else f"{m['tower']}/{m['layer']}",
    }
    summary = {}
    for grouping, key_of in groupings.items():
        members: dict[str, list[dict]] = {}
        for module in modules:
            if (key := key_of(module)) is not None:
                members.setdefault(key, []).append(module)
        summary[grouping] = {key: _pooled(group, ranks) for key, group in sorted(members.items(), key=lambda kv:
                                                                                  _natural_key(kv[0]))}
    summary["all"] = summary["all"]["all"]
    return summary


def _pooled(modules: list[dict], ranks: list[int]) -> dict:
    total = sum(m["frobenius_norm"] ** 2 for m in modules)
    base_total = sum(m["base_norm"] ** 2 for m in modules)
    stats = {"modules": len(modules), "parameters": sum(m["parameters"] for m in modules),
             "frobenius_norm": math.sqrt(total),
             "relative_change": math.sqrt(total / base_total) if base_total > 0 else None,
             "energy": {}, "rel_error": {}, "mean_energy": {}}
    for r in map(str, ranks):
        changed = [m for m in modules if m["energy"][r] is not None]
        energy = sum(m["energy"][r] * m["frobenius_norm"] ** 2 for m in changed) / total if total > 0 else None
        stats["energy"][r] = energy
        stats["rel_error"][r] = None if energy is None else math.sqrt(max(0.0, 1.0 - energy))
        stats["mean_energy"][r] = sum(m["energy"][r] for m in changed) / len(changed) if changed else None
    return stats


def write_delta_outputs(analysis: DeltaAnalysis, out_dir: str | Path, cfg: DeltaConfig, sources: dict,
                        started: float) -> dict:
    """Write factors per rank, `svd_analysis.json`, `svd_summary.txt` and the plots into `out_dir`, atomically."""
    from .delta_plots import plot_energy, plot_spectra

    ranks = sorted(cfg.ranks)
    result = {
        **sources,
        "config": cfg.to_dict(),
        "ranks": ranks,
        "factors": {str(r): {"file": f"factors_r{r}.safetensors", "alpha": cfg.alpha or r, "scaling": cfg.scaling(r)}
                    for r in ranks},
        "factor_convention": FACTOR_CONVENTION,
        "modules": analysis.modules,
        "groups": summarise_groups(analysis.modules, ranks),
        "cost": {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()},
        "versions": {package: importlib.metadata.version(package) for package in ("torch", "safetensors")},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for r in ranks:
            factors = {}
            for name, (U, S, Vh) in analysis.triplets.items():
                factors[f"{name}.lora_B"], factors[f"{name}.lora_A"] = lora_factors(U, S, Vh, r, cfg.scaling(r))
            save_tensors(tmp / f"factors_r{r}.safetensors", factors,
                         {"rank": r, **result["factors"][str(r)], "convention": FACTOR_CONVENTION, **sources})
            del factors
        write_json(tmp / "svd_analysis.json", result)
        (tmp / "svd_summary.txt").write_text(summary_text(result))
        plot_spectra(result, tmp / "spectrum.png")
        plot_energy(result, tmp / "energy_vs_rank.png")
    log.info("ΔW analysis of %d modules written to %s", len(analysis.modules), out_dir)
    return result


def export_delta(base_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: DeltaConfig) -> dict:
    """Analyse ΔW = W_teacher − W_base module by module and write every output into `out_dir`; returns the JSON.

    `out_dir` gets `svd_analysis.json`, `svd_summary.txt`, `spectrum.png`, `energy_vs_rank.png` and one
    `factors_r{r}.safetensors` per rank (keys `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r]).
    """
    started = time.perf_counter()
    base, teacher = Checkpoint(base_dir), Checkpoint(teacher_dir)
    shapes = matched_modules(base, teacher, cfg.include)
    log.info("ΔW of %d linear modules: %s − %s", len(shapes), teacher.source, base.source)
    analysis = analyse_deltas(iter_deltas(base, teacher, shapes), shapes, cfg)
    return write_delta_outputs(analysis, out_dir, cfg, {"base_dir": str(base_dir), "teacher_dir": str(teacher_dir)},
                               started)


def summary_text(result: dict) -> str:
    """A readable plain-text summary of `svd_analysis.json`."""
    ranks = [str(r) for r in result["ranks"]]
    groups = result["groups"]
    overall = groups["all"]
    rows = {"all": overall, **groups["by_tower"], **groups["by_kind"], **groups["by_tower_kind"]}
    table = pd.DataFrame({
        group: {"modules": g["modules"], "params": f"{g['parameters']:.3g}", "‖ΔW‖_F": f"{g['frobenius_norm']:.4g}",
                "‖ΔW‖/‖W‖": _fmt(g["relative_change"]), **{f"r={r}": _fmt(g["energy"][r]) for r in ranks}}
        for group, g in rows.items()}).T
    top = ranks[-1]
    layers = pd.DataFrame([{"tower": key.split("/")[0], "layer": int(key.split("/")[1]), "energy": g["energy"][top]}
                           for key, g in groups["by_layer"].items()])
    changed = [m for m in result["modules"] if m["energy"][top] is not None]
    least = sorted(changed, key=lambda m: m["energy"][top])[:5]
    alpha = result["config"]["alpha"]
    lines = [
        "ΔW = W_teacher − W_base",
        f"base:    {result['base_dir']}",
        f"teacher: {result['teacher_dir']}",
        f"{overall['modules']} linear modules, {overall['parameters']:.4g} parameters, ‖ΔW‖_F = "
        f"{overall['frobenius_norm']:.4g}, ‖ΔW‖_F / ‖W_base‖_F = {_fmt(overall['relative_change'])}",
        f"factors: ranks {', '.join(ranks)}; " + ("alpha = r, B @ A == ΔW_r" if alpha is None
                                                   else f"alpha = {alpha:g}, B @ A * alpha / r == ΔW_r"),
        "",
        "Energy captured by the rank-r SVD of each module (Σσ²_r / ‖ΔW‖²_F pooled over the group):",
        table.to_string(),
    ]
    if not layers.empty:
        pivot = layers.pivot(index="layer", columns="tower", values="energy")
        lines += ["", f"Energy at r={top} per layer depth:", pivot.to_string(float_format=lambda v: f"{v:.3f}",
                                                                            na_rep="-")]
    if least:
        lines += ["", f"Least low-rank modules (energy at r={top}):"]
        lines += [f"  {m['name']} {m['shape']}: {m['energy'][top]:.3f}" for m in least]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _natural_key(text: str) -> tuple:
    """Sort key putting layer 2 before layer 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))
