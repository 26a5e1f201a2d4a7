"""Low-rank feature decomposition: networks that factor one image's features X [T, C] into A [T, r] · B [r, C].

A projection net reads X twice: a row network maps each token's C features to r rank channels (A), a column
network maps each channel's T token values to r rank channels (B after a transpose), and X̂ = A·B has rank ≤ r.
The per-sample truncated SVD at the same rank is the optimum (Eckart–Young): `compare_with_svd` measures how
close each trained net gets and how long each takes.

Architectures (`ARCHS`):
- `ResMLP`: residual MLP blocks (LayerNorm, two linear layers, shortcut) in the row and column networks;
- `MLP`: plain Linear → LayerNorm → ReLU → Dropout stacks;
- `AdaLoRA`: the MLP stacks built from PEFT's AdaLoRA `SVDLinear` layers, ending in a `RankGate`: an AdaLoRA
  triplet (P, E, Q) whose per-rank scale E ∈ R^{r×1} multiplies the rank channels of A. PEFT's `RankAllocator`
  masks the least important E entries on AdaLoRA's cubic budget schedule (init warm-up, mask interval, final
  warm-up) down to `allocator_keep_ratio`·r channels.

`train_projection` trains one arch with AdamW on reconstruction MSE + lambda_b·mean(B²) + lambda_ortho·(AdaLoRA's
orthogonality of the SVD layers' factors) + lambda_act_ortho·(off-diagonal cosine² of A's columns), with
ReduceLROnPlateau and early stopping on the val MSE, and keeps the best checkpoint. After every epoch the whole
training state (model, optimizer, scheduler, allocator, counters, RNG, history) goes to one safetensors file in a
state directory outside the declared outputs, so a killed run resumes where it stopped, a finished run asked for
more `epochs` goes on, and `extra_epochs` continues a finished run from its best state (the original `--resume`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft.tuners.adalora import AdaLoraConfig, RankAllocator, SVDLinear
from safetensors import SafetensorError
from torch import nn
from tqdm import tqdm

from .config import Section, require
from .errors import CheckpointError, ConfigError, DataError, LowrankError
from .features import read_feature_file
from .io import load_tensors, save_tensors, write_json
from .lowrank_plots import plot_loss_curve, plot_spatial_comparison

log = logging.getLogger(__name__)

ARCHS = ("ResMLP", "MLP", "AdaLoRA")
WEIGHTS_NAME = "model.safetensors"
HISTORY_NAME = "history.json"
CURVE_NAME = "loss_curve.png"
STATE_NAME = "state.safetensors"
ADAPTER = "default"  # PEFT adapter name of the SVD layers and the rank gate


@dataclasses.dataclass(frozen=True)
class LowrankConfig(Section):
    """Projection nets and their training (defaults of the original low-rank decomposition code)."""

    key = "lowrank"
    archs: tuple[str, ...] = ARCHS
    rank: int = 128
    batch_size: int = 8
    epochs: int = 20
    extra_epochs: int = 0
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lambda_b: float = 1e-4
    lambda_ortho: float = 1e-3
    lambda_act_ortho: float = 0.0
    patience: int = 10
    lr_patience: int = 5
    lr_factor: float = 0.5
    min_improvement: float = 1e-4
    dropout: float = 0.1
    row_hidden: tuple[int, ...] = (1024, 256)
    col_hidden: tuple[int, ...] = (512, 256)
    lora_r: int = 8
    lora_alpha: int = 16
    allocator_init_warmup: int = 1000
    allocator_final_warmup: int = 1000
    allocator_mask_interval: int = 20
    allocator_keep_ratio: float = 0.25

    def check(self, key: str) -> None:
        require(len(self.archs) > 0, key, "archs", "must name at least one arch")
        for arch in self.archs:
            require(arch in ARCHS, key, "archs", f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        for name in ("rank", "batch_size", "epochs", "patience", "lora_r", "lora_alpha", "allocator_mask_interval"):
            require(getattr(self, name) >= 1, key, name, "must be at least 1")
        for name in ("extra_epochs", "lr_patience", "allocator_init_warmup", "allocator_final_warmup"):
            require(getattr(self, name) >= 0, key, name, "must be at least 0")
        for name in ("weight_decay", "lambda_b", "lambda_ortho", "lambda_act_ortho"):
            require(getattr(self, name) >= 0.0, key, name, "must be at least 0")
        require(self.lr > 0.0, key, "lr", "must be positive")
        require(0.0 < self.lr_factor < 1.0, key, "lr_factor", "must be in (0, 1)")
        require(0.0 <= self.min_improvement < 1.0, key, "min_improvement", "must be in [0, 1)")
        require(0.0 <= self.dropout < 1.0, key, "dropout", "must be in [0, 1)")
        require(0.0 < self.allocator_keep_ratio <= 1.0, key, "allocator_keep_ratio", "must be in (0, 1]")
        for name in ("row_hidden", "col_hidden"):
            require(all(width >= 1 for width in getattr(self, name)), key, name, "widths must be at least 1")


def check_arch(arch: str) -> None:
    """Raise ConfigError naming `lowrank.archs` unless `arch` is one of `ARCHS`."""
    if arch not in ARCHS:
        raise ConfigError(f"{LowrankConfig.key}.archs: unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


# ---------------------------------------------------------------- networks


class ResidualBlock(nn.Module):
    """LayerNorm → Linear → LayerNorm → ReLU → Dropout → Linear → LayerNorm, plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim))
        self.shortcut = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def mlp_block(in_dim: int, out_dim: int, dropout: float, linear=nn.Linear) -> nn.Sequential:
    return nn.Sequential(linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU(), nn.Dropout(dropout))


def svd_linear(in_dim: int, out_dim: int, lora_r: int, lora_alpha: int) -> SVDLinear:
    """PEFT's AdaLoRA SVDLinear, W x + P (Q ⊙ E) x · alpha / r, around a dense layer whose weight trains too
    (the original's SVDLinear trained it; PEFT freezes it because it expects pre-trained weights)."""
    # The layer reads only the adapter settings of this config; total_step matters to a RankAllocator alone.
    config = AdaLoraConfig(init_r=lora_r, lora_alpha=lora_alpha, total_step=1)
    layer = SVDLinear(nn.Linear(in_dim, out_dim), ADAPTER, config=config, r=lora_r, lora_alpha=lora_alpha)
    layer.get_base_layer().weight.requires_grad_(True)
    return layer


class LinearFactorHead(nn.Module):
    """Last layers of the row and column networks: A = linear(H_row), B = linear(H_col)ᵀ; every channel is active."""

    def __init__(self, row_dim: int, col_dim: int, rank: int):
        super().__init__()
        self.row = nn.Linear(row_dim, rank)
        self.col = nn.Linear(col_dim, rank)

    def forward(self, row_hidden: torch.Tensor, col_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row(row_hidden), self.col(col_hidden).transpose(1, 2)

    def effective_rank_mask(self) -> torch.Tensor:
        return torch.ones(self.row.out_features, dtype=torch.bool, device=self.row.weight.device)


class RankGate(nn.Module):
    """Last layers of the AdaLoRA net as one AdaLoRA triplet: A = H_row (Q ⊙ E)ᵀ, B = (H_col P)ᵀ.

    E ∈ R^{r×1} holds the maskable singular values (channel k of A is scaled by E_k); the PEFT names
    (lora_A = Q [r, row_dim], lora_E = E, lora_B = P [col_dim, r]) let PEFT's RankAllocator score and mask the
    rank channels, and the orthogonality penalty treat Q and P like the factors of every SVD layer.
    """

    def __init__(self, row_dim: int, col_dim: int, rank: int):
        super().__init__()
        self.lora_A = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(rank, row_dim) / math.sqrt(row_dim))})
        self.lora_E = nn.ParameterDict({ADAPTER: nn.Parameter(torch.ones(rank, 1))})
        self.lora_B = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(col_dim, rank) / math.sqrt(col_dim))})

    def forward(self, row_hidden: torch.Tensor, col_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = row_hidden @ (self.lora_A[ADAPTER] * self.lora_E[ADAPTER]).T
        return a, (col_hidden @ self.lora_B[ADAPTER]).transpose(1, 2)

    def effective_rank_mask(self) -> torch.Tensor:
        return self.lora_E[ADAPTER].detach().view(-1) != 0


class ProjectionNet(nn.Module):
    """X [B, T, C] → (X̂ = A·B [B, T, C], A [B, T, r], B [B, r, C])."""

    def __init__(self, row_net: nn.Module, col_net: nn.Module, head: LinearFactorHead | RankGate):
        super().__init__()
        self.row_net, self.col_net, self.head = row_net, col_net, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = self.head(self.row_net(x), self.col_net(x.transpose(1, 2)))
        return a @ b, a, b

    def effective_rank_mask(self) -> torch.Tensor:
        """Boolean [r]: the rank channels that are not masked."""
        return self.head.effective_rank_mask()

    def current_effective_rank(self) -> int:
        return int(self.effective_rank_mask().sum())


def build_projection(arch: str, num_tokens: int, channels: int, cfg: LowrankConfig) -> ProjectionNet:
    """The `arch` net for features [*, num_tokens, channels] at rank `cfg.rank`."""
    check_arch(arch)
    if arch == "ResMLP":
        block = functools.partial(ResidualBlock, dropout=cfg.dropout)
    elif arch == "MLP":
        block = functools.partial(mlp_block, dropout=cfg.dropout)
    else:
        linear = functools.partial(svd_linear, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        block = functools.partial(mlp_block, dropout=cfg.dropout, linear=linear)

    def stack(in_dim: int, widths: tuple[int, ...]) -> nn.Sequential:
        dims = (in_dim, *widths)
        return nn.Sequential(*(block(i, o) for i, o in zip(dims, dims[1:])))

    head = RankGate if arch == "AdaLoRA" else LinearFactorHead
    return ProjectionNet(stack(channels, cfg.row_hidden), stack(num_tokens, cfg.col_hidden),
                         head((channels, *cfg.row_hidden)[-1], (num_tokens, *cfg.col_hidden)[-1], cfg.rank))


# ---------------------------------------------------------------- losses


def orthogonality_penalty(model: nn.Module) -> torch.Tensor | float:
    """AdaLoRA's orthogonal regulariser (PEFT's AdaLoraModel.forward): the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F
    over every SVD layer's factors; 0 for a net without SVD layers."""
    terms = []
    for name, param in model.named_parameters():
        if f"lora_A.{ADAPTER}" in name or f"lora_B.{ADAPTER}" in name:
            gram = param @ param.T if "lora_A" in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
    return torch.stack(terms).mean() if terms else 0.0


def activation_orthogonality(a: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different rank channels (columns) of A [B, T, r]."""
    unit = F.normalize(a, dim=1)
    gram = unit.transpose(1, 2) @ unit
    return (gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))).pow(2).mean()


# ---------------------------------------------------------------- rank allocation


class RankGateAllocator:
    """AdaLoRA's rank schedule for a `RankGate`, run by PEFT's RankAllocator.

    Up to `allocator_init_warmup` steps all r channels train; the budget then falls cubically to
    keep_ratio·r, and every `allocator_mask_interval` steps the channels with the lowest smoothed sensitivity
    get E = 0; the last `allocator_final_warmup` steps of the `cfg.epochs` run (and any `extra_epochs`) train with
    the final mask re-applied after every step. `update` is AdaLoraModel.update_and_allocate's three-phase logic,
    which PEFT offers only on a model it injected adapters into.
    """

    def __init__(self, gate: RankGate, cfg: LowrankConfig, total_steps: int):
        self.gate = gate
        self.final_step = total_steps - cfg.allocator_final_warmup
        check_allocator_budget(cfg, total_steps)
        config = AdaLoraConfig(init_r=cfg.rank, target_r=kept_rank(cfg),
                               tinit=cfg.allocator_init_warmup, tfinal=cfg.allocator_final_warmup,
                               deltaT=cfg.allocator_mask_interval, total_step=total_steps)
        self.allocator = RankAllocator(gate, config, ADAPTER)
        self.rank_pattern: dict | None = None

    def update(self, step: int) -> None:
        """Call after `optimizer.step()` (gradients still in place) with the 1-based step count."""
        if step < self.final_step:
            self.rank_pattern = self.allocator.update_and_allocate(self.gate, step)[1] or self.rank_pattern
        elif step == self.final_step:
            self.rank_pattern = self.allocator.update_and_allocate(self.gate, step, force_mask=True)[1]
            self.allocator.reset_ipt()
        else:
            self.allocator.mask_using_rank_pattern(self.gate, self.rank_pattern)

    def budget_is_final(self, step: int) -> bool:
        return step >= self.final_step

    def state_tensors(self) -> dict[str, torch.Tensor]:
        scores = {"ipt": self.allocator.ipt, "exp_avg_ipt": self.allocator.exp_avg_ipt,
                  "exp_avg_unc": self.allocator.exp_avg_unc}
        return {f"allocator.{kind}.{name}": value for kind, values in scores.items() for name, value in values.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], rank_pattern: dict | None, device: torch.device) -> None:
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            prefix = f"allocator.{kind}."
            getattr(self.allocator, kind).update(
                {key[len(prefix):]: value.to(device) for key, value in tensors.items() if key.startswith(prefix)})
        self.rank_pattern = rank_pattern


def kept_rank(cfg: LowrankConfig) -> int:
    """The number of rank-gate channels an AdaLoRA net keeps: allocator_keep_ratio · rank, at least 1."""
    return max(1, round(cfg.allocator_keep_ratio * cfg.rank))


def allocator_steps(cfg: LowrankConfig, train_samples: int) -> int:
    """The optimizer steps of a run of `cfg.epochs` over `train_samples` samples: the allocator's budget."""
    return cfg.epochs * math.ceil(train_samples / cfg.batch_size)


def check_allocator_budget(cfg: LowrankConfig, total_steps: int) -> None:
    """ConfigError unless the init and final warm-ups leave AdaLoRA's allocator a budgeting phase."""
    if cfg.allocator_init_warmup >= total_steps - cfg.allocator_final_warmup:
        raise ConfigError(
            f"{cfg.key}.allocator_init_warmup: {cfg.allocator_init_warmup} init + {cfg.allocator_final_warmup} "
            f"final warm-up steps leave no budgeting phase in {total_steps} steps ({cfg.key}.epochs × steps per "
            f"epoch); lower the warm-ups or train longer")


def make_allocator(model: ProjectionNet, cfg: LowrankConfig, total_steps: int) -> RankGateAllocator | None:
    """The rank allocator of an AdaLoRA net that keeps fewer than all its channels, else None."""
    if not isinstance(model.head, RankGate) or kept_rank(cfg) >= cfg.rank:
        return None
    return RankGateAllocator(model.head, cfg, total_steps)


# ---------------------------------------------------------------- data


def read_features(path: str | Path) -> tuple[torch.Tensor, dict]:
    """`features` float32 [N, T, C] and the metadata of a cached feature file; problems raise DataError."""
    path = Path(path)
    tensors, meta = read_feature_file(path)
    features = tensors.get("features")
    if features is None or features.dim() != 3 or features.shape[0] == 0:
        shape = None if features is None else tuple(features.shape)
        raise DataError(f"{path}: expected a non-empty tensor 'features' [N, T, C], found {shape}")
    features = features.float()
    if not torch.isfinite(features).all():
        raise DataError(f"{path}: tensor 'features' holds NaN or infinite values")
    return features, meta


def _check_same_shape(reference: torch.Tensor, reference_path, features: torch.Tensor, path) -> None:
    if features.shape[1:] != reference.shape[1:]:
        raise DataError(f"{path}: features [T, C] = {list(features.shape[1:])} do not match "
                        f"{list(reference.shape[1:])} of {reference_path}")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of named tensors (names, dtypes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------- training


@dataclasses.dataclass
class _Run:
    """The progress of one training run, stored with its state after every epoch.

    A run is a base segment of up to `cfg.epochs` epochs and, when `cfg.extra_epochs` > 0, one continuation of
    up to that many epochs from the base segment's best state; either segment may end by early stopping.
    """

    epoch: int = 0
    step: int = 0
    segments: list = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    best_val_mse: float = math.inf
    bad_epochs: int = 0
    initial_val_mse: float | None = None
    records: list = dataclasses.field(default_factory=list)


def _budgets(cfg: LowrankConfig) -> list[int]:
    return [cfg.epochs] + ([cfg.extra_epochs] if cfg.extra_epochs else [])


def _segment_done(segment: dict, budget: int) -> bool:
    return segment["stop_reason"] == "early_stopping" or segment["epochs"] >= budget


def _extends(run: _Run, budgets: list[int]) -> bool:
    """Whether the stored segments are the start of the run that `budgets` asks for."""
    if len(run.segments) > len(budgets):
        return False
    for index, (segment, budget) in enumerate(zip(run.segments, budgets)):
        followed = index < len(run.segments) - 1
        if segment["epochs"] > budget or followed and not _segment_done(segment, budget):
            return False
    return True


def _fingerprint(arch: str, cfg: LowrankConfig, seed: int, train: torch.Tensor, val: torch.Tensor) -> dict:
    """What a stored state must match to be resumed. Epoch budgets are checked by `_extends`, except for AdaLoRA,
    whose rank schedule spans `epochs`."""
    ignored = {"archs", "extra_epochs"} | ({"epochs"} if arch != "AdaLoRA" else set())
    fingerprint = {"arch": arch, "seed": seed, "train": _digest({"features": train}), "val": _digest({"features": val}),
                   "config": {k: v for k, v in cfg.to_dict().items() if k not in ignored}}
    return json.loads(json.dumps(fingerprint))  # as it reads back from the state's JSON metadata


def _new_optimizer(model: nn.Module, cfg: LowrankConfig):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_factor, patience=cfg.lr_patience,
                                                           threshold=cfg.min_improvement)
    return optimizer, scheduler


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch `epoch`: a function of the seed and the epoch, so a resumed run repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@torch.no_grad()
def reconstruct(model: ProjectionNet, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """X̂ of every sample, in eval mode, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device))[0].cpu() for x in features.split(batch_size)])


def _train_one_epoch(model: ProjectionNet, features: torch.Tensor, order: torch.Tensor, cfg: LowrankConfig,
                     optimizer, allocator: RankGateAllocator | None, step: int) -> tuple[dict, int]:
    """One pass over `features` in `order`; returns the sample-weighted mean loss and MSE, and the new step count."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = mse_sum = 0.0
    for index in order.split(cfg.batch_size):
        x = features[index].to(device)
        x_hat, a, b = model(x)
        mse = F.mse_loss(x_hat, x)
        loss = mse + cfg.lambda_b * b.pow(2).mean() + cfg.lambda_ortho * orthogonality_penalty(model)
        if cfg.lambda_act_ortho:
            loss = loss + cfg.lambda_act_ortho * activation_orthogonality(a)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if allocator is not None:
            allocator.update(step)
        loss_sum += loss.item() * len(index)
        mse_sum += mse.item() * len(index)
    return {"train_loss": loss_sum / len(order), "train_mse": mse_sum / len(order)}, step


class _Training:
    """One arch's training run: the net, its optimiser, scheduler and allocator, and the run's progress.

    `save` puts all of it (with the best weights and the RNG state) into one safetensors file after every epoch;
    `resume` restores it when the stored fingerprint and epoch budgets match this run.
    """

    def __init__(self, arch: str, train: torch.Tensor, val: torch.Tensor, cfg: LowrankConfig, seed: int,
                 state_path: Path, device: torch.device):
        self.arch, self.train, self.val, self.cfg, self.seed, self.state_path = arch, train, val, cfg, seed, state_path
        torch.manual_seed(seed)
        self.model = build_projection(arch, train.shape[1], train.shape[2], cfg).to(device)
        self.optimizer, self.scheduler = _new_optimizer(self.model, cfg)
        self.allocator = make_allocator(self.model, cfg, allocator_steps(cfg, len(train)))
        self.fingerprint = _fingerprint(arch, cfg, seed, train, val)
        self.budgets = _budgets(cfg)
        self.run = _Run(segments=[{"start_epoch": 0, "epochs": 0, "stop_reason": None}],
                        initial_val_mse=self.val_mse())
        self.best: dict[str, torch.Tensor] | None = None

    def val_mse(self) -> float:
        return F.mse_loss(reconstruct(self.model, self.val, self.cfg.batch_size), self.val).item()

    def save(self) -> None:
        tensors = {f"model.{k}": v for k, v in _snapshot(self.model).items()}
        tensors |= {f"best.{k}": v for k, v in (self.best or {}).items()}
        optim = self.optimizer.state_dict()
        tensors |= {f"optim.{i}.{k}": v for i, state in optim["state"].items() for k, v in state.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta = {"fingerprint": self.fingerprint, "run": dataclasses.asdict(self.run),
                "param_groups": optim["param_groups"], "scheduler": self.scheduler.state_dict()}
        if self.allocator is not None:
            tensors |= self.allocator.state_tensors()
            meta["rank_pattern"] = self.allocator.rank_pattern
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
        save_tensors(self.state_path, tensors, meta | {"checksum": _digest(tensors)})

    def resume(self) -> bool:
        """Restore the stored state if it belongs to this run; False (a fresh start) when there is none, or when it is
        damaged (unreadable or failing its checksum: a warning)."""
        if not self.state_path.is_file():
            return False
        try:
            tensors, meta = load_tensors(self.state_path)
            if meta.get("checksum") != _digest(tensors):
                raise ValueError("the tensors fail their checksum")
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("%s: damaged training state (%s); starting over", self.state_path, err)
            return False
        run = _Run(**meta["run"])
        if meta["fingerprint"] != self.fingerprint or not _extends(run, self.budgets):
            log.warning("%s: the stored state is of another config, data or epoch budget; starting over",
                        self.state_path)
            return False

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model."))
        optim_state: dict[int, dict] = {}
        for key, value in part("optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.allocator is not None:
            self.allocator.load_state(tensors, meta.get("rank_pattern"), next(self.model.parameters()).device)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.run, self.best = run, part("best.") or None
        log.info("%s: resuming %s after epoch %d", self.state_path, self.arch, run.epoch)
        return True

    def next_budget(self) -> int | None:
        """The epoch budget of the segment still to train, starting the continuation when it is due; None when done."""
        segment = self.run.segments[-1]
        budget = self.budgets[len(self.run.segments) - 1]
        if not _segment_done(segment, budget):
            segment["stop_reason"] = None
            return budget
        if len(self.run.segments) == len(self.budgets):
            return None
        log.info("%s: up to %d extra epochs from the best epoch %d", self.arch, self.budgets[-1], self.run.best_epoch)
        self.model.load_state_dict(self.best)
        self.optimizer, self.scheduler = _new_optimizer(self.model, self.cfg)
        self.run.bad_epochs = 0
        self.run.segments.append({"start_epoch": self.run.epoch, "from_best_epoch": self.run.best_epoch,
                                  "epochs": 0, "stop_reason": None})
        return self.budgets[-1]

    def train_segment(self, budget: int) -> None:
        """Epochs until the segment's budget or early stopping, saving the state after each.

        The plateau scheduler, early stopping and the best checkpoint follow the val MSE once the net has its final
        rank budget: from the first epoch, except while an AdaLoRA net is still reducing its rank."""
        run, cfg, segment = self.run, self.cfg, self.run.segments[-1]
        with tqdm(total=budget, initial=segment["epochs"], desc=f"lowrank {self.arch}", unit="epoch") as progress:
            while not _segment_done(segment, budget):
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                order = _epoch_order(len(self.train), self.seed, run.epoch + 1)
                record, run.step = _train_one_epoch(self.model, self.train, order, cfg, self.optimizer,
                                                    self.allocator, run.step)
                run.epoch += 1
                segment["epochs"] += 1
                val_mse = self.val_mse()
                if not math.isfinite(val_mse):
                    raise LowrankError(f"{self.arch}: val MSE is {val_mse} after epoch {run.epoch}; "
                                       f"lower {cfg.key}.lr")
                record = {"epoch": run.epoch, **record, "val_mse": val_mse, "lr": lr,
                          "effective_rank": self.model.current_effective_rank(),
                          "seconds": time.perf_counter() - started}
                run.records.append(record)
                if self.allocator is None or self.allocator.budget_is_final(run.step):
                    self.scheduler.step(val_mse)
                    if val_mse < run.best_val_mse * (1 - cfg.min_improvement):
                        run.best_epoch, run.best_val_mse, run.bad_epochs = run.epoch, val_mse, 0
                        self.best = _snapshot(self.model)
                    else:
                        run.bad_epochs += 1
                    if run.bad_epochs >= cfg.patience:
                        segment["stop_reason"] = "early_stopping"
                if segment["stop_reason"] is None and segment["epochs"] >= budget:
                    segment["stop_reason"] = "max_epochs"
                self.save()
                log.info("%s epoch %d: train mse %.4g, val mse %.4g, lr %.3g, effective rank %d", self.arch,
                         run.epoch, record["train_mse"], val_mse, lr, record["effective_rank"])
                progress.set_postfix(train_mse=f"{record['train_mse']:.4g}", val_mse=f"{val_mse:.4g}")
                progress.update()


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def train_projection(arch: str, train_path: str | Path, val_path: str | Path, cfg: LowrankConfig | dict,
                     out_dir: str | Path, state_dir: str | Path, seed: int = 0,
                     device: str | torch.device | None = None) -> dict:
    """Train the `arch` projection net on cached features, resuming from `state_dir` when it holds this run's state.

    Writes to `out_dir`: `history.json` (per-epoch train/val MSE, lr, effective rank; best epoch, stop reason),
    `loss_curve.png`, and last `model.safetensors` (the best weights; metadata: arch, rank, effective rank, shapes,
    net config, best epoch). `state_dir/state.safetensors`, rewritten after every epoch, is not an output.
    Returns a summary (best epoch and val MSE, epochs run, stop reason, effective rank).
    """
    cfg = cfg if isinstance(cfg, LowrankConfig) else LowrankConfig.from_dict(cfg)
    check_arch(arch)
    out_dir = Path(out_dir)
    train, _ = read_features(train_path)
    val, _ = read_features(val_path)
    _check_same_shape(train, train_path, val, val_path)
    if cfg.rank > min(train.shape[1:]):
        raise ConfigError(f"{cfg.key}.rank: {cfg.rank} exceeds min(T, C) = {min(train.shape[1:])} of the features "
                          f"in {train_path}")

    training = _Training(arch, train, val, cfg, seed, Path(state_dir) / STATE_NAME, _device(device))
    training.resume()
    while (budget := training.next_budget()) is not None:
        training.train_segment(budget)

    run, model = training.run, training.model
    model.load_state_dict(training.best)
    history = {"arch": arch, "rank": cfg.rank, "seed": seed, "initial_val_mse": run.initial_val_mse,
               "best_epoch": run.best_epoch, "best_val_mse": run.best_val_mse, "epochs_run": run.epoch,
               "stop_reason": run.segments[-1]["stop_reason"], "segments": run.segments,
               "effective_rank": model.current_effective_rank(), "epochs": run.records, "config": cfg.to_dict()}
    write_json(out_dir / HISTORY_NAME, history)
    plot_loss_curve(history, out_dir / CURVE_NAME)
    save_tensors(out_dir / WEIGHTS_NAME, training.best, {
        "arch": arch, "rank": cfg.rank, "effective_rank": history["effective_rank"], "num_tokens": train.shape[1],
        "channels": train.shape[2], "best_epoch": run.best_epoch, "best_val_mse": run.best_val_mse,
        "net": {k: getattr(cfg, k) for k in ("row_hidden", "col_hidden", "dropout", "lora_r", "lora_alpha")}})
    summary = {k: history[k] for k in ("arch", "best_epoch", "best_val_mse", "initial_val_mse", "epochs_run",
                                       "stop_reason", "effective_rank")}
    log.info("%s: %s", arch, summary)
    return summary


# ---------------------------------------------------------------- comparison with the SVD


def svd_reconstruct(features: torch.Tensor, rank: int) -> torch.Tensor:
    """The truncated SVD of each sample of [N, T, C] (one batched torch.linalg.svd): its best rank-`rank` fit."""
    u, s, vh = torch.linalg.svd(features, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def reconstruction_errors(features: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: MSE, relative Frobenius error ‖X − X̂‖_F / ‖X‖_F, energy captured 1 − ‖X − X̂‖²_F / ‖X‖²_F."""
    residual = (features - reconstruction).flatten(1).pow(2).sum(1)
    total = features.flatten(1).pow(2).sum(1)
    return {"mse": residual / features[0].numel(), "rel_frobenius": (residual / total).sqrt(),
            "energy_captured": 1 - residual / total}


def load_projection(arch: str, path: str | Path, cfg: LowrankConfig) -> tuple[ProjectionNet, dict]:
    """Rebuild a net written by `train_projection` (a `model.safetensors` or the directory holding it), on the CPU."""
    check_arch(arch)
    path = Path(path)
    path = path / WEIGHTS_NAME if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{path}: projection weights do not exist")
    try:
        tensors, meta = load_tensors(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable projection weights ({err})") from None
    if meta.get("arch") != arch:
        raise CheckpointError(f"{path}: holds a {meta.get('arch')!r} net, not {arch!r}")
    model = build_projection(arch, meta["num_tokens"], meta["channels"], cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not match the {cfg.key} config ({str(err).splitlines()[0]} ...)") \
            from None
    return model.eval(), meta


@torch.no_grad()
def _timed(fn, features: torch.Tensor, batch_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """`fn` over `features` in batches on `device`: (outputs on the CPU, seconds inside `fn` after a warm-up batch)."""
    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn(features[:batch_size].to(device))
    outputs, seconds = [], 0.0
    for batch in features.split(batch_size):
        batch = batch.to(device)
        synchronise()
        started = time.perf_counter()
        output = fn(batch)
        synchronise()
        seconds += time.perf_counter() - started
        outputs.append(output.cpu())
    return torch.cat(outputs), seconds


def compare_with_svd(arch: str, weights: str | Path, test_path: str | Path, cfg: LowrankConfig | dict,
                     out_json: str | Path, out_png: str | Path, image_index: int = 0,
                     device: str | torch.device | None = None) -> dict:
    """Compare the trained `arch` net with the per-sample truncated SVD at the net's effective rank on the test split.

    Both run over the same batches of `cfg.batch_size` samples on `device` (the SVD batched, the net in one forward
    per batch) and are timed after a warm-up batch. Writes `out_png` (channel maps of test sample `image_index`:
    original, SVD, net, and both error maps) and, last, `out_json`: MSE, relative Frobenius error, energy captured
    and seconds per sample of each, and the net/SVD ratios. Returns the JSON content.
    """
    cfg = cfg if isinstance(cfg, LowrankConfig) else LowrankConfig.from_dict(cfg)
    device = _device(device)
    test, meta = read_features(test_path)
    model, weights_meta = load_projection(arch, weights, cfg)
    expected = [weights_meta["num_tokens"], weights_meta["channels"]]
    if list(test.shape[1:]) != expected:
        raise DataError(f"{test_path}: features [T, C] = {list(test.shape[1:])} do not match {expected} the net "
                        f"was trained on")
    grid_h, grid_w = meta.get("grid_h"), meta.get("grid_w")
    if not isinstance(grid_h, int) or not isinstance(grid_w, int) or grid_h * grid_w != test.shape[1]:
        raise DataError(f"{test_path}: metadata grid_h x grid_w = {grid_h} x {grid_w} does not lay out "
                        f"{test.shape[1]} tokens")
    if not 0 <= image_index < len(test):
        raise ConfigError(f"image_index: {image_index} is out of range for the {len(test)} samples of {test_path}")

    model.to(device)
    rank = model.current_effective_rank()
    svd_hat, svd_seconds = _timed(lambda x: svd_reconstruct(x, rank), test, cfg.batch_size, device)
    net_hat, net_seconds = _timed(lambda x: model(x)[0], test, cfg.batch_size, device)
    sides = {}
    for name, reconstruction, seconds in (("svd", svd_hat, svd_seconds), ("network", net_hat, net_seconds)):
        errors = reconstruction_errors(test, reconstruction)
        sides[name] = {key: values.mean().item() for key, values in errors.items()}
        sides[name]["seconds_per_sample"] = seconds / len(test)
    result = {
        "arch": arch, "rank": weights_meta["rank"], "effective_rank": rank, "svd_rank": rank,
        "n_samples": len(test), "num_tokens": test.shape[1], "channels": test.shape[2], "device": str(device),
        "batch_size": cfg.batch_size, **sides,
        "ratio": {key: _ratio(sides["network"][key], sides["svd"][key])
                  for key in ("mse", "rel_frobenius", "seconds_per_sample")},
        "image_index": image_index, "weights": str(weights), "best_epoch": weights_meta.get("best_epoch"),
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
    }
    plot_spatial_comparison(test[image_index], svd_hat[image_index], net_hat[image_index], grid_h, grid_w, out_png,
                            title=f"{arch} vs truncated SVD at rank {rank}, test sample {image_index}")
    write_json(out_json, result)
    log.info("%s vs SVD at rank %d: MSE ratio %.4g, seconds per sample %.3g (net) vs %.3g (SVD)", arch, rank,
             result["ratio"]["mse"] or math.nan, sides["network"]["seconds_per_sample"],
             sides["svd"]["seconds_per_sample"])
    return result


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None
