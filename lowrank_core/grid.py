"""The LoRA ablation grid: built-in presets and strategies, and the list of arms a `lora.grid` config describes.

Kept free of torch / PEFT imports: the Snakefile expands the grid with it at parse time.

An arm is one (objective, preset, init, strategy, learning_rate) combination; every arm runs once per seed.
`design: product` takes the full product of the lists; `design: one_at_a_time` takes the first entry of each list as
the baseline arm and varies one axis at a time around it. `extra_arms` are appended to either.

A rank sweep (`lora.grid.ranks`) turns each listed preset into one preset per rank, `<preset>-r<rank>`, with its
alpha by `lora.grid.rank_alpha` (`r`, `2r` or a number): the rank study is one config line, and each rank is a value
of the preset axis.

The learning-rate axis (`lora.grid.lrs`) replaces the lr of `lora.train` / `train_by_objective` for every arm, so arms
compared along it share everything else; without it, every arm has the value `default` (its objective's lr).
"""

from __future__ import annotations

import itertools

from .errors import ConfigError

AXES = ("objective", "preset", "init", "strategy", "learning_rate")
LISTS = {"objective": "objectives", "preset": "presets", "init": "inits", "strategy": "strategies",
         "learning_rate": "lrs"}  # lora.grid keys
DEFAULT_LR = "default"  # the learning_rate of every arm when `lora.grid.lrs` is not given
OBJECTIVES = ("head", "head_frozen", "lm", "hybrid", "hybrid_frozen", "depth", "sft")
INITS = ("random", "gaussian", "svd", "pissa", "olora", "orthogonal", "eva", "corda", "lora_ga")
DATA_INITS = ("eva", "corda", "lora_ga")  # PEFT's inits that read training data first; settings in lora.<init>
VISION_OBJECTIVES = ("head", "head_frozen", "hybrid", "hybrid_frozen")
FROZEN_HEAD_OBJECTIVES = ("head_frozen", "hybrid_frozen")
HEAD_ONLY_OBJECTIVES = ("head", "head_frozen")  # their loss never runs the language model

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
# The ablation scripts' presets; `lora.presets.<name>` overrides any field or adds a preset.
PRESETS = {
    "light": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "standard": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": _ATTENTION},
    "full": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": _ATTENTION + _MLP},
    "aggressive": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": _ATTENTION + _MLP},
}
# Strategies A / B / C: heads only; the later half of the blocks + heads; every block + heads. A strategy gives a
# selection per part ("tower") of the model: block towers take all / none / a fraction range / an index range / a list
# of indices, whole towers true / false. The towers are the model family's (see `modalities`).
STRATEGIES = {
    "head_only": {"vision": "none", "merger": False, "language": "none", "lm_head": True},
    "later_half": {"vision": "0.5:1", "merger": True, "language": "0.5:1", "lm_head": True},
    "all": {"vision": "all", "merger": True, "language": "all", "lm_head": True},
}
# A depth model's: transformers' Depth Anything / DPT (backbone blocks, neck, depth head) and VGGT (frame and global
# attention blocks, depth head, camera head), as in the VGGT-on-ETH3D study.
DEPTH_STRATEGIES = {
    "transformers": {
        "head_only": {"head": True},
        "later_half": {"backbone": "0.5:1", "neck": True, "head": True},
        "all": {"backbone": "all", "neck": True, "head": True},
    },
    "vggt": {
        "head_only": {"depth_head": True},
        "later_half": {"frame": "0.5:1", "global": "0.5:1", "depth_head": True},
        "all": {"frame": "all", "global": "all", "depth_head": True, "camera_head": True},
    },
}


def named_entries(builtin: dict, overrides: dict | None) -> dict:
    """Built-in presets (or strategies) with the config's entries merged over them field by field."""
    overrides = overrides or {}
    return {name: {**builtin.get(name, {}), **overrides.get(name, {})} for name in {**builtin, **overrides}}


def grid_presets(lora: dict) -> dict:
    """Every preset an arm can name: the built-in ones with `lora.presets` over them, plus, with `lora.grid.ranks`,
    each preset of `lora.grid.presets` at each rank (`rank_preset`). ConfigError names an unknown preset's key."""
    presets = named_entries(PRESETS, lora.get("presets"))
    grid = lora.get("grid", {})
    for name in grid.get("presets", []):
        if name not in presets:
            raise ConfigError(f"lora.grid.presets: unknown preset {name!r} (known: {', '.join(presets)})")
    rule = grid.get("rank_alpha", "2r")
    return presets | {rank_preset(name, rank): {**presets[name], "r": rank,
                                                "alpha": {"r": rank, "2r": 2 * rank}.get(rule, rule)}
                      for name in grid.get("presets", []) for rank in grid.get("ranks") or []}


def rank_preset(preset: str, rank: int) -> str:
    """The name of `preset` at another rank in a rank sweep."""
    return f"{preset}-r{rank}"


def grid_arms(lora: dict, objectives: tuple[str, ...] = OBJECTIVES, strategies: dict = STRATEGIES) -> list[dict]:
    """The arms of `lora.grid` (dicts of the axes plus `seed`), each once, in config order; `objectives` and the
    built-in `strategies` are those of the model's modality. A learning_rate is a text label (`lr_label`).

    Raises ConfigError naming the key when an axis value is unknown.
    """
    grid = lora.get("grid", {})
    lrs = [lr_label(lr) for lr in grid.get("lrs") or []] or [DEFAULT_LR]
    known = {"objective": objectives, "init": INITS, "preset": grid_presets(lora),
             "strategy": named_entries(strategies, lora.get("strategies")), "learning_rate": lrs}
    lists = {axis: list(grid.get(LISTS[axis], [])) for axis in AXES} | {"learning_rate": lrs}
    if grid.get("ranks"):
        lists["preset"] = [rank_preset(name, rank) for name in lists["preset"] for rank in grid["ranks"]]
    for axis, values in lists.items():
        if not values:
            raise ConfigError(f"lora.grid.{LISTS[axis]}: must list at least one {axis}")
        for value in values:
            if value not in known[axis]:
                raise ConfigError(f"lora.grid.{LISTS[axis]}: unknown {axis} {value!r} "
                                  f"(known: {', '.join(known[axis])})")
    if grid.get("design", "one_at_a_time") == "product":
        arms = [dict(zip(AXES, values)) for values in itertools.product(*lists.values())]
    else:
        baseline = {axis: values[0] for axis, values in lists.items()}
        arms = [baseline] + [{**baseline, axis: value} for axis, values in lists.items() for value in values[1:]]
    for index, extra in enumerate(grid.get("extra_arms", [])):
        extra = {**extra, "learning_rate": lr_label(extra["lr"]) if "lr" in extra else lrs[0]}
        for axis in AXES:
            if extra.get(axis) not in known[axis]:
                key = "lr" if axis == "learning_rate" else axis
                raise ConfigError(f"lora.grid.extra_arms[{index}].{key}: unknown {axis} {extra.get(axis)!r}"
                                  + (" (not in lora.grid.lrs)" if key == "lr" else ""))
        arms.append({axis: extra[axis] for axis in AXES})
    unique = list({tuple(arm[a] for a in AXES): arm for arm in arms}.values())
    return [{**arm, "seed": seed} for arm in unique for seed in grid.get("seeds", [0])]


def arm_train_settings(lora: dict, objective: str, learning_rate: str) -> dict:
    """`lora.train` with the objective's `lora.train_by_objective` entry over it and the arm's learning rate (unless
    `default`) over both: the settings the arm trains with."""
    train = {**lora["train"], **lora.get("train_by_objective", {}).get(objective, {})}
    return train if learning_rate == DEFAULT_LR else {**train, "lr": float(learning_rate)}


def lr_label(lr: float) -> str:
    """A learning rate as the grid names it: its shortest exact decimal text (0.001, 3e-05)."""
    return repr(float(lr))


def arm_label(arm: dict) -> str:
    """objective/preset/init/strategy[/lr_<learning_rate>]: the arm's name in tables and the report (without an lr
    axis, no lr part)."""
    label = "{objective}/{preset}/{init}/{strategy}".format(**arm)
    return label if arm["learning_rate"] == DEFAULT_LR else f"{label}/lr_{arm['learning_rate']}"


def arm_path(arm: dict) -> str:
    """The place of one seed of the arm under `results/lora/` and `results/eval/`:
    objective/preset/init/strategy/lr_<learning_rate>/seedN."""
    return "{objective}/{preset}/{init}/{strategy}/lr_{learning_rate}/seed{seed}".format(**arm)
