"""PEFT's LoRA initialisations beyond random: their options, the data-driven ones' preprocessing, and their cost.

Where each starts (s = the adapter's scaling):

- `orthogonal`: A and B drawn from the two halves of one random r×r orthogonal matrix, so B A = 0: the base.
- `eva` (activations): A = the top right-singular vectors of each target's inputs (incremental PCA over the first
  `lora.eva.batches` training batches, cycled until they converge; ranks redistributed across the targets up to
  `rho`·r), B = 0: the base. Saved as plain LoRA with a rank pattern; a target given rank 0 keeps no adapter.
- `corda` (covariance): the SVD of W·C, with C the covariance of each target's inputs over `lora.corda.samples`
  training records run one at a time (as PEFT's hook reads them); B A its top (`ipm`) or bottom (`kpm`) r
  components, the base weight becomes W − s·B A: the merged model is the base.
- `lora_ga` (gradients): B, A from the SVD of the objective's gradient on each target's weight, averaged over the
  first `lora.lora_ga.batches` training batches, the base weight becomes W − s·B A: the merged model is the base.

corda and lora_ga (like pissa and olora, `MUTATING_INITS`) change the base weights: their trained adapters are saved
converted to plain LoRA of rank 2r against the untouched base. All but random, gaussian and svd act on linear layers
only (`check_init`).

The preprocessing reads the arm's first training records in order, so the seed enters only through the student's
freshly drawn parts (a new detection head, a fusion projection: the activations or gradients may pass through them).
Without such parts one preprocessing serves every seed of the arm. Its result is cached (safetensors, with what it was
computed for and what it cost) so a killed job and the arm's other seeds read it back instead of computing it again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Literal

import torch
from accelerate import PartialState
from peft import EvaConfig, LoraConfig, get_eva_state_dict
from peft.tuners.lora.config import CordaConfig, LoraGAConfig
from peft.tuners.lora.corda import CordaEigens, preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from safetensors import safe_open
from torch import nn

from .config import Section, require
from .errors import ConfigError
from .io import load_tensors, read_json, save_tensors
from .runtime import peak_rss_mb
from .training import Batches

log = logging.getLogger(__name__)
# Warnings a user can do nothing about: LoRA-GA enables gradients on the target weights only, so the hooks it counts
# backward passes with fire on outputs; saving a CorDA adapter converted to plain LoRA (as done here) copies its config
# with init_lora_weights=True, which then ignores its sub-config
for message in ("Full backward hook is firing when gradients are computed with respect to module outputs",
                "`corda_config` specified but will be ignored",
                "CorDA changes the base weights of the model and should thus not be used with other adapters"):
    warnings.filterwarnings("ignore", message=message, category=UserWarning)

MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")  # W_base changes: adapters are saved converted to plain LoRA
LINEAR_ONLY_INITS = ("orthogonal", "pissa", "olora", "eva", "corda", "lora_ga")
EVA_MAX_PASSES = 100  # passes over lora.eva.batches before EVA's components count as not converging


@dataclasses.dataclass(frozen=True)
class EvaSettings(Section):
    """EVA: how many training batches its incremental PCA cycles over, rank redistribution, convergence, whitening."""

    key = "lora.eva"
    batches: int = 4
    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False

    def check(self, key: str) -> None:
        require(self.batches >= 1, key, "batches", "must be at least 1")
        require(self.rho >= 1, key, "rho", "must be at least 1 (1: every target keeps rank r)")
        require(0 <= self.tau <= 1, key, "tau", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class CordaSettings(Section):
    """CorDA: how many training records its covariance reads, and which components start the adapter."""

    key = "lora.corda"
    samples: int = 32
    method: Literal["ipm", "kpm"] = "ipm"

    def check(self, key: str) -> None:
        require(self.samples >= 1, key, "samples", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class LoraGASettings(Section):
    """LoRA-GA: how many training batches its gradient averages, and how the gradient's SVD becomes B and A."""

    key = "lora.lora_ga"
    batches: int = 4
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16

    def check(self, key: str) -> None:
        require(self.batches >= 1, key, "batches", "must be at least 1")
        require(self.stable_gamma >= 1, key, "stable_gamma", "must be at least 1")


def peft_init_options(arm) -> dict:
    """`init_lora_weights` and the init's own sub-config, as PEFT's `LoraConfig` takes them."""
    if arm.init == "pissa":
        return {"init_lora_weights": f"pissa_niter_{arm.pissa_niter}" if arm.pissa_niter else "pissa"}
    if arm.init in ("random", "svd"):
        return {"init_lora_weights": True}
    options = {"init_lora_weights": arm.init}
    if arm.init == "eva":
        options["eva_config"] = EvaConfig(rho=arm.eva.rho, tau=arm.eva.tau, whiten=arm.eva.whiten)
    elif arm.init == "corda":
        options["corda_config"] = CordaConfig(corda_method=arm.corda.method)
    elif arm.init == "lora_ga":
        options["lora_ga_config"] = LoraGAConfig(direction=arm.lora_ga.direction, scale=arm.lora_ga.scale,
                                                 stable_gamma=arm.lora_ga.stable_gamma)
    return options


def check_init(model: nn.Module, targets: list[str], arm, modality, train_records: int) -> None:
    """ConfigError naming the key when `arm.init` cannot start this arm: the modality's batches cannot drive it, it
    acts on linear layers only and a target is not one, or its preprocessing reads more than the `train_records`."""
    if arm.init in modality.info.unsupported_inits:
        raise ConfigError(f"lora.grid.inits: {arm.init} is not available for model.modality {modality.name}: "
                          f"{modality.info.unsupported_inits[arm.init]}")
    other = [name for name in targets if not isinstance(model.get_submodule(name), nn.Linear)]
    if arm.init in LINEAR_ONLY_INITS and other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ConfigError(f"lora.grid.inits: {arm.init} initialises linear layers only, but the arm's strategy also "
                          f"targets {len(other)} other modules ({shown})")
    if init_records(arm) > train_records:
        setting = {"eva": "eva.batches", "corda": "corda.samples", "lora_ga": "lora_ga.batches"}[arm.init]
        raise ConfigError(f"lora.{setting}: {arm.init} preprocessing reads {init_records(arm)} training records, "
                          f"more than the {train_records} there are")


def init_records(arm) -> int:
    """How many training records the init's preprocessing reads (0 for inits without one)."""
    return {"eva": arm.eva.batches * arm.train.batch_size, "corda": arm.corda.samples,
            "lora_ga": arm.lora_ga.batches * arm.train.batch_size}.get(arm.init, 0)


def seed_dependent(student: nn.Module) -> bool:
    """Whether the student has freshly drawn trainable parts beside its model (a new head, a fusion projection)."""
    return any(p.requires_grad for name, p in student.named_parameters() if not name.startswith("model."))


# ---------------------------------------------------------------- preprocessing


def process_state() -> PartialState:
    """This process's place in a data-parallel launch, as `train_loop`'s Accelerator sees it (CPU processes run on
    gloo: a first `PartialState()` without `cpu` would take them for one process each)."""
    return PartialState(cpu=not torch.cuda.is_available())


def preprocess(student: nn.Module, config: LoraConfig, arm, batcher: Callable, records: list,
               cache: Path | None = None, identity: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run `arm.init`'s preprocessing through the (not yet PEFT-wrapped) `student` on the training `records` it reads
    (`init_records`), on this process's accelerator, without touching the global RNG. Returns its tensors (per target
    module: `<name>.eva`, `<name>.S/U/V`, `<name>.grad`) and its cost (`seconds`, `peak_memory_mb`: CUDA max
    allocated on a GPU, else the process's peak RSS).

    With `cache`, the result is read from there when it was computed for `identity`, else computed (by the main
    process of a data-parallel launch) and written there with its cost, which later readers report.
    """
    compute = {"eva": _eva, "corda": _corda, "lora_ga": _lora_ga}[arm.init]

    def measured() -> tuple[dict[str, torch.Tensor], dict]:
        device, home = process_state().device, next(student.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        student.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            tensors = {k: v.detach().cpu().contiguous() for k, v in compute(student, config, arm, batcher,
                                                                             records, device).items()}
        student.to(home)
        cost = {"seconds": time.perf_counter() - started,
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                else peak_rss_mb()}
        log.info("%s preprocessing: %.1f s, peak %.0f MB", arm.init, cost["seconds"], cost["peak_memory_mb"])
        return tensors, cost

    if cache is None:
        return measured()
    identity = json.loads(json.dumps(identity))
    state = process_state()
    if state.is_main_process:
        if cache.exists() and _identity(cache) == identity:
            log.info("%s preprocessing read back from %s", arm.init, cache)
        else:
            tensors, cost = measured()
            save_tensors(cache, tensors, {"identity": identity, "cost": cost})
    state.wait_for_everyone()
    tensors, meta = load_tensors(cache)
    return tensors, meta["cost"]


def _identity(cache: Path) -> dict | None:
    """What the cached preprocessing was computed for (its metadata alone: LoRA-GA's gradients are as large as the
    targeted weights)."""
    with safe_open(str(cache), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("identity", "null"))


def attach(model: nn.Module, init: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give the target modules of the unwrapped `model` what PEFT's corda / lora_ga init reads off them (eva's
    components are loaded after wrapping: `eva_state_dict`)."""
    if init == "eva":
        return
    for key, value in tensors.items():
        name, part = key.rsplit(".", 1)
        module = model.get_submodule(name)
        if init == "lora_ga":
            module._peft_loraga_grad = value
        elif init == "corda" and part == "S":
            module.eigens = CordaEigens(S_WC=value, U_WC=tensors[f"{name}.U"], V_WC=tensors[f"{name}.V"])


def eva_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cached EVA components under the PEFT model's module names, as `initialize_lora_eva_weights` reads them."""
    return {f"base_model.model.{key.removesuffix('.eva')}": value for key, value in tensors.items()}


def _eva(student, config, arm, batcher, records, device) -> dict[str, torch.Tensor]:
    batches = Batches(records, arm.train.batch_size, batcher, drop_last=True)
    forwards, limit = itertools.count(1), EVA_MAX_PASSES * len(batches)

    def forward(_, batch):
        if next(forwards) > limit:
            raise ConfigError(f"lora.eva.tau: EVA's components did not converge to {arm.eva.tau} in "
                               f"{EVA_MAX_PASSES} passes over {len(batches)} batches; lower tau or raise batches")
        return student(batch)

    student.eval()
    components = get_eva_state_dict(student.model, batches, config, forward_fn=forward, prepare_model_inputs_fn=None,
                                    prepare_layer_inputs_fn=None, gather_distributed_inputs=False,
                                    show_progress_bar=False)
    student.train()
    return {f"{name}.eva": value for name, value in components.items()}


def _corda(student, config, arm, batcher, records, device) -> dict[str, torch.Tensor]:
    def run_model():
        for record in records:
            student(_to(batcher([record]), device))

    student.eval()
    preprocess_corda(student.model, config, run_model=run_model)
    student.train()
    eigens = {name: student.model.get_submodule(name).eigens for name in config.target_modules}
    return {f"{name}.{part}": getattr(value, f"{part}_WC") for name, value in eigens.items() for part in "SUV"}


def _lora_ga(student, config, arm, batcher, records, device) -> dict[str, torch.Tensor]:
    batches = Batches(records, arm.train.batch_size, batcher, drop_last=True)

    def train_step():
        for batch in batches:
            student(_to(batch, device)).backward()

    student.train()
    preprocess_loraga(student.model, config, train_step)
    student.zero_grad(set_to_none=True)  # the head / fusion gradients are no part of the start
    return {f"{name}.grad": student.model.get_submodule(name)._peft_loraga_grad for name in config.target_modules}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------- cost


def teacher_cost(delta_dir: str | Path) -> dict:
    """What the svd init's start cost before its arm ran: the teacher's fine-tune (its `train_summary.json`, where
    the ΔW export records a teacher that has one) plus the ΔW export (`svd_analysis.json`)."""
    analysis = read_json(Path(delta_dir) / "svd_analysis.json")
    cost = {"seconds": analysis["cost"]["seconds"], "peak_memory_mb": analysis["cost"]["peak_rss_mb"]}
    summary = Path(analysis["teacher_dir"]) / "train_summary.json"
    if not summary.is_file():
        log.warning("svd init: %s is missing, its cost leaves the teacher's fine-tune out", summary)
        return cost
    teacher = read_json(summary)
    return {"seconds": cost["seconds"] + teacher["train_seconds"],
            "peak_memory_mb": max(cost["peak_memory_mb"], teacher["peak_memory_mb"])}
