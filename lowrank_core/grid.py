"""The LoRA ablation grid: built-in presets and strategies, and the list of arms a `lora.grid` config describes.

Kept free of torch / PEFT imports: the Snakefile expands the grid with it at parse time.

An arm is one (objective, preset, init, strategy) combination; every arm runs once per seed. `design: product`
takes the full product of the four lists; `design: one_at_a_time` takes the first entry of each list as the baseline
arm and varies one axis at a time around it. `extra_arms` are appended to either.
"""

from __future__ import annotations

import itertools

from .errors import ConfigError

AXES = ("objective", "preset", "init", "strategy")
LISTS = {"objective": "objectives", "preset": "presets", "init": "inits", "strategy": "strategies"}  # lora.grid keys
OBJECTIVES = ("head", "head_frozen", "lm", "hybrid", "hybrid_frozen", "depth")
INITS = ("random", "gaussian", "svd", "pissa", "olora")
VISION_OBJECTIVES = ("head", "head_frozen", "hybrid", "hybrid_frozen")
FROZEN_HEAD_OBJECTIVES = ("head_frozen", "hybrid_frozen")

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


def grid_arms(lora: dict, objectives: tuple[str, ...] = OBJECTIVES, strategies: dict = STRATEGIES) -> list[dict]:
    """The arms of `lora.grid` (dicts of the four axes plus `seed`), each once, in config order; `objectives` and the
    built-in `strategies` are those of the model's modality.

    Raises ConfigError naming the key when an axis value is unknown.
    """
    grid = lora.get("grid", {})
    known = {"objective": objectives, "init": INITS,
             "preset": named_entries(PRESETS, lora.get("presets")),
             "strategy": named_entries(strategies, lora.get("strategies"))}
    lists = {axis: list(grid.get(LISTS[axis], [])) for axis in AXES}
    for axis, values in lists.items():
        if not values:
            raise ConfigError(f"lora.grid.{LISTS[axis]}: must list at least one {axis}")
        for value in values:
            if value not in known[axis]:
                raise ConfigError(f"lora.grid.{LISTS[axis]}: unknown {axis} {value!r} (known: {', '.join(known[axis])})")
    if grid.get("design", "one_at_a_time") == "product":
        arms = [dict(zip(AXES, values)) for values in itertools.product(*lists.values())]
    else:
        baseline = {axis: values[0] for axis, values in lists.items()}
        arms = [baseline] + [{**baseline, axis: value} for axis, values in lists.items() for value in values[1:]]
    for index, extra in enumerate(grid.get("extra_arms", [])):
        for axis in AXES:
            if extra.get(axis) not in known[axis]:
                raise ConfigError(f"lora.grid.extra_arms[{index}].{axis}: unknown {axis} {extra.get(axis)!r}")
        arms.append({axis: extra[axis] for axis in AXES})
    unique = list({tuple(arm[a] for a in AXES): arm for arm in arms}.values())
    return [{**arm, "seed": seed} for arm in unique for seed in grid.get("seeds", [0])]


def arm_path(arm: dict) -> str:
    """The arm's place under `results/lora/` and `results/eval/`: objective/preset/init/strategy/seedN."""
    return "{objective}/{preset}/{init}/{strategy}/seed{seed}".format(**arm)
