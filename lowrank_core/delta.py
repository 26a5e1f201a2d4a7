"""ΔW = W_teacher − W_base: how low-rank a full fine-tune is, and LoRA-ready SVD factors of it.

`export_delta` streams both checkpoints tensor by tensor (each tensor is memory-mapped, read and released before
the next, so a 7B pair needs about one weight pair of RAM, not two models), and for every targeted linear weight:

- computes ΔW in float64 (rounded by 1e-16 at most), ‖ΔW‖_F and its top-k singular triplets, k = the
  largest configured rank (clipped to min(shape)): an exact SVD with the full spectrum when min(shape) <=
  `full_spectrum_threshold`, else ("gram") Rayleigh–Ritz on the top k + oversampling eigenvectors of the float32
  Gram matrix, as accurate as the exact SVD on any spectrum at a fraction of its cost (randomized SVDs are not:
  power iterations converge slowly on the flat spectra real fine-tunes have);
- checks the factors a posteriori: `factor_errors` bounds, to first order in the triplets' residuals, the relative
  error of every exported rank-r product against the exact ΔW_r; a module over `factor_tolerance` is redone with
  the exact SVD (`fallback`), and the error is recorded per module and rank (`factor_rel_error`);
- reports, per configured rank r, the energy captured Σσ²_{≤r} / ‖ΔW‖²_F and the relative reconstruction error
  ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = sqrt(1 − energy). Both are exact for the exported factors (Ritz triplets satisfy
  U_rᵀ ΔW V_r = diag(σ_r)); for Ritz values they are bounds on the optimal rank-r values;
- pools modules into groups (tower: vision / merger / language / lm_head; kind: attention / mlp / other; their
  product; and tower × layer depth), where a group's energy is Σ captured / Σ ‖ΔW‖²_F over its modules;
- writes each module's factors at every rank into the factor files as soon as they are checked (`FactorFiles`):
  memory holds one module's ΔW and triplets, never a rank's factors.

Module names are the names of the model's `nn.Linear` modules: checkpoints saved in a legacy layout (transformers
writes Qwen2.5-VL as `visual.*` / `model.layers.*`, Depth Anything's DINOv2 as `attention.attention.query`) are
renamed with transformers' own conversion mapping for the `architectures` in `config.json` (`model.visual.*` /
`model.language_model.layers.*`, `attention.q_proj`), so the include regex and the factor keys use the names a PEFT
student sees. That mapping needs the model's skeleton, so transformers and the model's code are imported only where
`may_rename` cannot rule a renaming out (not for a Llama or a Qwen3-VL, say); pandas and matplotlib only for the
summary and the plots, after the SVDs.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import scipy.linalg
import torch
from safetensors import SafetensorError, safe_open
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .config import Section, require
from .errors import CheckpointError, ConfigError
from .io import atomic_path, read_json, write_json
from .runtime import peak_rss_mb

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_INCLUDE = (r"^(?:model\.visual\.(?:blocks\.\d+|merger|deepstack_merger_list\.\d+)\."
                   r"|model\.(?:language_model\.)?layers\.\d+\.|lm_head$)")
FLOAT32_UNIT = 2.0 ** -24
FACTOR_CONVENTION = ("lora_B @ lora_A * scaling == ΔW_r; lora_B = U_r·diag(sqrt(σ_r / scaling)), "
                     "lora_A = diag(sqrt(σ_r / scaling))·V_rᵀ; rank-deficient modules are zero-padded to r")


@dataclasses.dataclass(frozen=True)
class DeltaConfig(Section):
    """What the ΔW export analyses and how.

    `ranks` are the LoRA ranks analysed and exported (`factors_r{r}.safetensors` each); `include` is a regex searched
    in module names (2-D `.weight` tensors only; embeddings never); modules with min(shape) <=
    `full_spectrum_threshold` get an exact SVD and their full spectrum, the others Rayleigh–Ritz on the top
    k + `oversampling` eigenvectors of their Gram matrix. `factor_tolerance` bounds the a-posteriori relative error
    of the factors against the exact ΔW_r: a module over it gets the exact SVD instead (None: the error is recorded,
    never enforced). `alpha` is the LoRA alpha of the students the factors are for: the factors satisfy
    B @ A * alpha / r == ΔW_r; None means alpha = r (scaling 1, B @ A == ΔW_r).
    """

    key = "delta"
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    include: str = DEFAULT_INCLUDE
    oversampling: int = 10
    full_spectrum_threshold: int = 128
    factor_tolerance: float | None = 1e-3
    alpha: float | None = None

    def check(self, key: str) -> None:
        require(len(self.ranks) > 0, key, "ranks", "must list at least one rank")
        require(all(r >= 1 for r in self.ranks), key, "ranks", "every rank must be at least 1")
        require(len(set(self.ranks)) == len(self.ranks), key, "ranks", "must not repeat a rank")
        try:
            re.compile(self.include)
        except re.error as err:
            raise ConfigError(f"{key}.include: not a valid regular expression ({err})") from None
        require(self.oversampling >= 0, key, "oversampling", "must be at least 0")
        require(self.full_spectrum_threshold >= 0, key, "full_spectrum_threshold", "must be at least 0")
        require(self.factor_tolerance is None or self.factor_tolerance > 0, key, "factor_tolerance",
                "must be positive")
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
        rename = _module_renamer(self.directory, self.files)
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


def _module_renamer(directory: Path, keys: Iterable[str]):
    """Checkpoint key -> parameter name, with transformers' conversion mapping for the checkpoint's model (built on
    the meta device from its config: the mapping covers its sub-models, e.g. a depth model's DINOv2 backbone), or
    the identity where `may_rename` rules every renaming out (importing transformers and building the skeleton cost
    a 135M Llama export about 3 s and 130 MB of its peak RSS)."""
    config_path = directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if not config.get("architectures") or not may_rename(config, keys):
        return lambda key: key
    return _skeleton_renamer(directory, config["architectures"][0])


def _skeleton_renamer(directory: Path, architecture: str):
    import transformers

    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        return lambda key: key
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    with torch.device("meta"):
        model = model_class(transformers.AutoConfig.from_pretrained(directory))
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, [])[0]


def may_rename(config: dict, keys: Iterable[str]) -> bool:
    """False only where transformers' conversion mapping leaves every key of a checkpoint with this `config.json`
    as it is, judged from the mapping's source (`conversion_mapping.py`, parsed, not imported).

    The mapping applies its entries for the model's class names and model types, plus "legacy" renamings to every
    model. So: False when no string in the source names one of the config's `architectures` or model types (at any
    depth: a backbone's too) or a class defined in those model types' modelling modules, and no source pattern of
    the "legacy" renamings matches a key. True (the exact renaming, with the model skeleton) wherever that
    cannot be told: the source or a model type's module not found, "legacy" built in a way this does not read.
    """
    spec = importlib.util.find_spec("transformers")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else Path()
    try:
        tree = ast.parse((root / "conversion_mapping.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return True
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    types = {value for value in _config_values(config, "model_type") if isinstance(value, str)}
    if strings & (types | set(config.get("architectures") or [])):
        return True
    for model_type in types:
        module = _model_module(root / "models", model_type)
        if module is None:
            return True
        classes = {m.group(1) for path in module.glob("modeling_*.py")
                   for m in re.finditer(r"^class (\w+)\(", path.read_text(), re.M)}
        if strings & classes:
            return True
    legacy = _legacy_sources(tree)
    if legacy is None:
        return True
    try:
        pattern = re.compile("|".join(f"(?:{source})" for source in legacy) or "(?!)")
    except re.error:
        return True
    return any(pattern.search(key) for key in keys)


def _config_values(config, field: str) -> Iterator:
    """Every value of `field` in a nested config dict (sub-configs included)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == field:
                yield value
            yield from _config_values(value, field)
    elif isinstance(config, list):
        for value in config:
            yield from _config_values(value, field)


def _model_module(models: Path, model_type: str) -> Path | None:
    """transformers' `models/<module>` directory of `model_type`: its name with `-` as `_`, or its longest `_`-prefix
    that is one (a sub-config's type: `qwen3_vl_text` lives in `qwen3_vl`); None if none is."""
    parts = model_type.replace("-", "_").split("_")
    return next((models / "_".join(parts[:n]) for n in range(len(parts), 0, -1)
                 if (models / "_".join(parts[:n])).is_dir()), None)


def _legacy_sources(tree: ast.Module) -> list[str] | None:
    """The source patterns of the "legacy" renamings in the conversion mapping's source (`"legacy": [...]` in a dict,
    `mapping["legacy"] = [...]` or `+= [...]`: lists of calls whose `source_patterns` argument, or first one, is
    literal), or None if "legacy" is built any other way."""
    values = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            values += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "legacy"]
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            if any(_is_legacy(t) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                values.append(node.value)
        elif isinstance(node, ast.Attribute) and _is_legacy(node.value) and node.attr != "copy":
            return None  # e.g. mapping["legacy"].extend(...)
    sources = []
    for call in (c for value in values for c in (value.elts if isinstance(value, ast.List) else [value])):
        if not isinstance(call, ast.Call):
            return None
        source = next((kw.value for kw in call.keywords if kw.arg == "source_patterns"), next(iter(call.args), None))
        patterns = source.elts if isinstance(source, (ast.List, ast.Tuple)) else [source]
        if not all(isinstance(p, ast.Constant) and isinstance(p.value, str) for p in patterns):
            return None
        sources += [p.value for p in patterns]
    return sources


def _is_legacy(node: ast.AST) -> bool:
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "legacy"


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
    """(ΔW in float64, rounded by 1e-16 at most; ‖W_base‖_F); never writes into the (possibly memory-mapped)
    inputs."""
    if base_weight.dtype == teacher_weight.dtype == torch.float32:  # numpy casts on the fly: twice as fast
        delta = torch.from_numpy(np.subtract(teacher_weight.numpy(), base_weight.numpy(), dtype=np.float64))
    else:
        delta = teacher_weight.to(torch.float64, copy=True).sub_(base_weight)
    return delta, float(torch.linalg.vector_norm(base_weight, dtype=torch.float32))


def iter_deltas(base: Checkpoint, teacher: Checkpoint, names: Iterable[str]
                ) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(module name, ΔW, ‖W_base‖_F) per module, holding one weight pair at a time."""
    for name in names:
        delta, base_norm = weight_delta(base.tensor(name + ".weight"), teacher.tensor(name + ".weight"))
        yield name, delta.flatten(1), base_norm


def top_singular_triplets(matrix: torch.Tensor, k: int, cfg: DeltaConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Top-k (U [m, k], σ [k], Vᵀ [k, n]) in float64, the singular values known and the method used.

    "exact": the full SVD (every singular value known) when min(shape) <= `cfg.full_spectrum_threshold` or a
    subspace of q = k + `cfg.oversampling` dimensions would not be smaller. Otherwise "gram": the top-q eigenvectors
    of the float32 Gram matrix of the shorter side span the subspace (up to float32 rounding, whatever the
    spectrum), and Rayleigh–Ritz on it, in float64, gives the triplets (the q Ritz values known).
    """
    matrix = matrix.double()
    q = k + cfg.oversampling
    if min(matrix.shape) <= cfg.full_spectrum_threshold or q >= min(matrix.shape):
        return _exact_svd(matrix, k)
    wide = matrix.shape[0] <= matrix.shape[1]
    short_side = matrix if wide else matrix.mT  # [p, N], p <= N: the Gram matrix and the basis are p-sized
    basis = _gram_basis(matrix, q)
    projected = basis.mT @ short_side  # [q, N]; its SVD, from the eigenvectors of its q x q Gram matrix
    values, vectors = torch.linalg.eigh(projected @ projected.mT)
    S = values.flip(0).clamp(min=0).sqrt()
    small_U = vectors.flip(1)[:, :k]
    U = basis @ small_U
    Vh = torch.where(S[:k, None] > 0, small_U.mT @ projected / S[:k, None], 0.0)  # ΔWᵀu_i = σ_i v_i exactly
    if not wide:
        U, Vh = Vh.mT, U.mT
    return U, S[:k], Vh, S, "gram"


def _exact_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k], S, "exact"


def _gram_basis(matrix: torch.Tensor, q: int) -> torch.Tensor:
    """Orthonormal [p, q] basis of the top-q eigenvectors of the float32 p x p Gram matrix of `matrix` (A Aᵀ or AᵀA,
    p = min(shape))."""
    p = min(matrix.shape)
    # syrk, the upper triangle only (half a matmul), of Aᵀ as a Fortran array (A's own memory: no copy)
    gram = scipy.linalg.blas.ssyrk(1.0, matrix.float().numpy().T, trans=int(matrix.shape[0] <= matrix.shape[1]))
    _, vectors = scipy.linalg.eigh(gram, lower=False, subset_by_index=[p - q, p - 1], driver="evr", overwrite_a=True,
                                   check_finite=False)
    return torch.linalg.qr(torch.from_numpy(vectors).double()).Q


def factor_errors(matrix: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, ranks: Iterable[int],
                  complement: float = 0.0) -> dict[int, float | None]:
    """A-posteriori relative error ‖U_r diag(σ_r) V_rᵀ − ΔW_r‖_F / ‖ΔW_r‖_F of the rank-r factors against the exact
    ΔW_r of `matrix`, per rank r (None where σ_r = 0: nothing to reconstruct).

    To first order in the residuals of the triplets on the shorter side, ρ_i = ‖ΔW v_i − σ_i u_i‖ (out <= in; else
    ‖ΔWᵀ u_i − σ_i v_i‖; the other side's is zero for Ritz triplets from a basis of the shorter side, rounding for an
    exact SVD): a residual orthogonal to the subspace they span moves ΔW_r by ρ_i σ_i sqrt(σ_i² + c²) / (σ_i² − c²),
    where c is `complement`, the largest singular value of ΔW outside that subspace (0 for a full SVD; for
    Rayleigh–Ritz on the top-q eigenvectors of the Gram matrix, the smallest Ritz value σ_q >= σ_{q+1}). Plus
    6·2⁻²⁴·√r, the float32 rounding of the stored factors. Costs one product of ΔW with k vectors.
    """
    matrix = matrix.double()
    if matrix.shape[0] <= matrix.shape[1]:
        residual = (matrix @ Vh.mT - U * S).square().sum(0)
    else:
        residual = (U.mT @ matrix - S[:, None] * Vh).square().sum(1)
    s2, c2 = S.square(), complement ** 2
    weight = torch.where(s2 > c2, s2 * (s2 + c2) / (s2 - c2).square(),
                         torch.where(s2 > 0, torch.inf, 0.0))  # σ_i <= c: unresolved; σ_i = c = 0: nothing left
    moved = torch.cumsum(torch.where(residual > 0, residual * weight, 0.0), 0)
    captured = torch.cumsum(s2, 0)
    errors = {}
    for r in ranks:
        i = min(r, S.numel()) - 1
        errors[r] = (None if captured[i] <= 0 else
                     float((moved[i] / captured[i]).sqrt()) + 6 * FLOAT32_UNIT * math.sqrt(i + 1))
    return errors


def accurate_triplets(matrix: torch.Tensor, k: int, cfg: DeltaConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, dict, bool]:
    """`top_singular_triplets`, its `factor_errors` at `cfg.ranks`, and whether it fell back to the exact SVD: it
    does when the "gram" factors' worst error exceeds `cfg.factor_tolerance` (the exact SVD's is float64 rounding)."""
    matrix = matrix.double()
    U, S, Vh, spectrum, method = top_singular_triplets(matrix, k, cfg)
    complement = 0.0 if method == "exact" else float(spectrum[-1])
    errors = factor_errors(matrix, U, S, Vh, cfg.ranks, complement)
    worst = max((e for e in errors.values() if e is not None), default=0.0)
    fallback = method != "exact" and cfg.factor_tolerance is not None and not worst <= cfg.factor_tolerance
    if fallback:
        U, S, Vh, spectrum, method = _exact_svd(matrix, k)
        errors = factor_errors(matrix, U, S, Vh, cfg.ranks)
    return U, S, Vh, spectrum, method, errors, fallback


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


class FactorFiles:
    """The `factors_r{r}.safetensors` of every rank, filled in module by module (`write`) as the triplets come.

    Every tensor's place is laid out up front from the module shapes (float32, keys `<module>.lora_A` [r, in] and
    `<module>.lora_B` [out, r]; metadata as `io.save_tensors` writes it: the rank, its `factor_file` entry, the
    convention and `sources`), so no rank's factors are ever all in memory.
    A context manager; leaving it without an error raises RuntimeError if a module was never written.
    """

    def __init__(self, directory: Path, shapes: dict[str, list[int]], cfg: DeltaConfig, sources: dict):
        self.cfg, self.pending, self.files = cfg, set(shapes), {}
        for r in sorted(cfg.ranks):
            metadata = {"rank": r, **factor_file(cfg, r), "convention": FACTOR_CONVENTION, **sources}
            layout, end = {}, 0
            for name, (out, in_) in shapes.items():
                for key, shape in ((f"{name}.lora_A", [r, in_]), (f"{name}.lora_B", [out, r])):
                    layout[key] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + 4 * math.prod(shape)]}
                    end = layout[key]["data_offsets"][1]
            header = json.dumps({"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}, **layout}).encode()
            header += b" " * (-len(header) % 8)  # data 8-byte aligned, as safetensors writes it
            file = open(directory / f"factors_r{r}.safetensors", "wb")
            self.files[r] = (file, 8 + len(header), layout)
            file.write(len(header).to_bytes(8, "little") + header)
            file.truncate(8 + len(header) + end)

    def write(self, name: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        """Write module `name`'s factors (`lora_factors` of its top-k triplets) at every rank."""
        for r, (file, start, layout) in self.files.items():
            B, A = lora_factors(U, S, Vh, r, self.cfg.scaling(r))
            for key, factor in ((f"{name}.lora_A", A), (f"{name}.lora_B", B)):
                file.seek(start + layout[key]["data_offsets"][0])
                file.write(factor.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).data)
        self.pending.discard(name)

    def __enter__(self) -> FactorFiles:
        return self

    def __exit__(self, *exc) -> None:
        for file, _, _ in self.files.values():
            file.close()
        if self.pending and exc[0] is None:
            raise RuntimeError(f"no factors written for {len(self.pending)} module(s), e.g. {min(self.pending)}")


@dataclasses.dataclass
class DeltaAnalysis:
    """Per-module records (JSON-ready) and the top-k triplets (U, σ, Vᵀ) of every module (none where they went
    straight to `FactorFiles`)."""

    modules: list[dict]
    triplets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def analyse_deltas(deltas: Iterable[tuple[str, torch.Tensor, float]], shapes: dict[str, list[int]],
                   cfg: DeltaConfig, factors: FactorFiles | None = None) -> DeltaAnalysis:
    """Spectrum, energy and error per rank of every (name, ΔW, ‖W_base‖_F) in `deltas`.

    Each module's triplets go to `factors` as they come; without it they are kept in float32, allocated up front
    from `shapes` (name -> [out, in] of every module in `deltas`): allocated one by one between ΔW-sized
    temporaries, they would fragment the heap and grow RSS per module.
    """
    ranks = sorted(cfg.ranks)
    ks = {name: min(ranks[-1], *shape) for name, shape in shapes.items()}
    analysis = DeltaAnalysis([], {} if factors is not None else {
        name: (torch.empty(out, ks[name]), torch.empty(ks[name]), torch.empty(ks[name], in_))
        for name, (out, in_) in shapes.items()})
    progress = tqdm(total=len(shapes), desc="ΔW SVD", unit="module")  # wrapping `deltas` would hold the last ΔW
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):  # scipy's BLAS: the Gram eigenvectors
        for name, delta, base_norm in deltas:
            k = ks[name]
            U, S, Vh, spectrum, method, errors, fallback = accurate_triplets(delta, k, cfg)
            if fallback:
                log.info("%s: the gram factors missed delta.factor_tolerance; exact SVD instead", name)
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
                "fallback": fallback,
                "singular_values": spectrum.tolist(),
                "energy": {str(r): e for r, e in energy.items()},
                "rel_error": {str(r): None if e is None else math.sqrt(1.0 - e) for r, e in energy.items()},
                "factor_rel_error": {str(r): errors[r] for r in ranks},
            })
            if factors is not None:
                factors.write(name, U, S, Vh)
            else:
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
    """Write the factors per rank of `analysis.triplets`, `svd_analysis.json`, `svd_summary.txt` and the plots into
    `out_dir`, atomically; returns the JSON."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with FactorFiles(tmp, {m["name"]: m["shape"] for m in analysis.modules}, cfg, sources) as factors:
            for name, triplets in analysis.triplets.items():
                factors.write(name, *triplets)
        result = _write_reports(analysis, tmp, cfg, sources, started)
    log.info("ΔW analysis of %d modules written to %s", len(analysis.modules), out_dir)
    return result


def _write_reports(analysis: DeltaAnalysis, directory: Path, cfg: DeltaConfig, sources: dict, started: float) -> dict:
    from .delta_plots import plot_energy, plot_spectra

    ranks = sorted(cfg.ranks)
    result = {
        **sources,
        "config": cfg.to_dict(),
        "ranks": ranks,
        "factors": {str(r): factor_file(cfg, r) for r in ranks},
        "factor_convention": FACTOR_CONVENTION,
        "modules": analysis.modules,
        "factor_rel_error_max": max((e for m in analysis.modules for e in m["factor_rel_error"].values()
                                     if e is not None), default=None),
        "groups": summarise_groups(analysis.modules, ranks),
        "cost": {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()},
        "versions": {package: importlib.metadata.version(package) for package in ("torch", "safetensors")},
    }
    write_json(directory / "svd_analysis.json", result)
    (directory / "svd_summary.txt").write_text(summary_text(result))
    plot_spectra(result, directory / "spectrum.png")
    plot_energy(result, directory / "energy_vs_rank.png")
    return result


def factor_file(cfg: DeltaConfig, rank: int) -> dict:
    """The `factors` entry of `svd_analysis.json` for `rank` (also in its file's metadata)."""
    return {"file": f"factors_r{rank}.safetensors", "alpha": cfg.alpha or rank, "scaling": cfg.scaling(rank)}


def export_delta(base_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: DeltaConfig) -> dict:
    """Analyse ΔW = W_teacher − W_base module by module and write every output into `out_dir`; returns the JSON.

    `out_dir` gets `svd_analysis.json`, `svd_summary.txt`, `spectrum.png`, `energy_vs_rank.png` and one
    `factors_r{r}.safetensors` per rank (keys `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r]), each
    module's factors written as soon as its SVD is done, atomically (all or nothing).
    """
    started = time.perf_counter()
    base, teacher = Checkpoint(base_dir), Checkpoint(teacher_dir)
    shapes = matched_modules(base, teacher, cfg.include)
    log.info("ΔW of %d linear modules: %s − %s", len(shapes), teacher.source, base.source)
    sources = {"base_dir": str(base_dir), "teacher_dir": str(teacher_dir)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with FactorFiles(tmp, shapes, cfg, sources) as factors:
            analysis = analyse_deltas(iter_deltas(base, teacher, shapes), shapes, cfg, factors)
        result = _write_reports(analysis, tmp, cfg, sources, started)
    log.info("ΔW analysis of %d modules written to %s", len(analysis.modules), out_dir)
    return result


def summary_text(result: dict) -> str:
    """A readable plain-text summary of `svd_analysis.json`."""
    import pandas as pd  # here: 30 MB of imports the export itself does not need

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
        accuracy_line(result),
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


def accuracy_line(result: dict) -> str:
    """How accurate the exported factors are (the a-posteriori check) and which SVD each module got."""
    methods = collections.Counter(m["method"] for m in result["modules"])
    fallbacks = sum(m["fallback"] for m in result["modules"])
    worst, tolerance = result["factor_rel_error_max"], result["config"]["factor_tolerance"]
    return (f"factors: max relative error against the exact ΔW_r (a posteriori) "
            f"{'-' if worst is None else f'{worst:.2g}'}"
            + ("" if tolerance is None else f" (tolerance {tolerance:g})") + "; SVD per module: "
            + ", ".join(f"{count} {method}" for method, count in sorted(methods.items()))
            + f" ({fallbacks} exact after missing the tolerance)")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _natural_key(text: str) -> tuple:
    """Sort key putting layer 2 before layer 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))
