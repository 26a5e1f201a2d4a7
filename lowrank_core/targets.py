"""Where the adapters go: a strategy's selection per part ("tower") of a model, resolved to module names.

A model family (Qwen-VL / Qwen LM, Depth Anything / DPT, VGGT) is a set of towers, each a regex over full module
names. A block tower (vision blocks, language layers, a backbone's blocks) takes `all`, `none`, a fraction range of
its depth (`0.5:1` = the later half), an inclusive index range (`12-23`) or a list of indices, and within the
selected blocks the preset's module kinds; a whole tower (merger, lm_head, a depth head) takes `true` / `false` and
then every adaptable module it has. Full names keep a language `gate_proj` from catching the vision tower's
`mlp.gate_proj`. Aliases let a preset's kinds name fused or differently named layers (the Qwen vision tower's
`attn.qkv` stands for q/k/v_proj).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from torch import nn

from .config import Section
from .errors import ConfigError

Layers = str | list[int]
_LAYER_RANGE = re.compile(r"^(\d+)-(\d+)$")
_FRACTION_RANGE = re.compile(r"^(\d*\.?\d+):(\d*\.?\d+)$")


@dataclasses.dataclass(frozen=True)
class Tower:
    """Modules whose full name matches `pattern` (group 1: the block index of a block tower)."""

    pattern: str
    blocks: bool
    aliases: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def match(self, name: str) -> re.Match | None:
        return re.match(self.pattern, name)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's towers and the module types PEFT LoRA can take in it."""

    towers: dict[str, Tower]
    adaptable: tuple[type, ...] = (nn.Linear,)


_QWEN_VISION_ALIASES = {"qkv": frozenset({"q_proj", "k_proj", "v_proj"}), "proj": frozenset({"o_proj"}),
                        "linear_fc1": frozenset({"up_proj"}), "linear_fc2": frozenset({"down_proj"})}
QWEN = Family({
    "vision": Tower(r"^model\.visual\.blocks\.(\d+)\.", True, _QWEN_VISION_ALIASES),
    "merger": Tower(r"^model\.visual\.(?:merger|deepstack_merger_list\.\d+)\.", False),
    "language": Tower(r"^model\.(?:language_model\.)?layers\.(\d+)\.", True),
    "lm_head": Tower(r"^lm_head$", False),
})


@dataclasses.dataclass(frozen=True)
class StrategyConfig(Section):
    """Where adapters go: a selection per tower (see the module docstring); towers not named get none."""

    key: ClassVar[str] = "lora.strategies"
    places: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: dict | None, key: str | None = None) -> StrategyConfig:
        key = key or cls.key
        places = []
        for tower, selection in dict(data or {}).items():
            if isinstance(selection, list) and all(type(i) is int for i in selection):
                selection = tuple(selection)
            elif not isinstance(selection, (bool, str)):
                raise ConfigError(f"{key}.{tower}: {selection!r} is not true / false, a layer selection or a list of "
                                  "block indices")
            if isinstance(selection, str):
                fraction, span = _FRACTION_RANGE.match(selection), _LAYER_RANGE.match(selection)
                if not (selection in ("all", "none") or span and int(span[1]) <= int(span[2])
                        or fraction and float(fraction[1]) < float(fraction[2]) <= 1):
                    raise ConfigError(f"{key}.{tower}: {selection!r} is not all, none, a fraction range like 0.5:1, "
                                      "or an ascending index range like 12-23")
            places.append((tower, selection))
        return cls(tuple(places))

    def to_dict(self) -> dict[str, Any]:
        return {tower: list(s) if isinstance(s, tuple) else s for tower, s in self.places}


def select_layers(selection: Layers, depth: int, key: str) -> set[int]:
    """The block indices `selection` picks out of `depth` blocks (see the module docstring for the forms)."""
    if isinstance(selection, (list, tuple)):
        picked = set(selection)
    elif selection == "all":
        picked = set(range(depth))
    elif selection == "none":
        picked = set()
    elif match := _LAYER_RANGE.match(selection):
        picked = set(range(int(match[1]), int(match[2]) + 1))
    else:
        start, stop = map(float, _FRACTION_RANGE.match(selection).groups())
        picked = set(range(round(start * depth), round(stop * depth)))
    outside = sorted(i for i in picked if not 0 <= i < depth)
    if outside:
        raise ConfigError(f"{key}: layer {outside[0]} is outside this model's {depth} blocks (0-{depth - 1})")
    return picked


def resolve_targets(model: nn.Module, preset, strategy: StrategyConfig, active: set[str],
                    key: str = "lora.strategies", preset_key: str = "lora.presets", family: Family = QWEN) -> list[str]:
    """Full names of the modules that get adapters: the strategy's places within the `active` towers (those the
    objective runs) ∩ the preset's module kinds in block towers, every adaptable module of a selected whole tower.

    Raises ConfigError (naming `key` or `preset_key`) for a tower the family does not have, a selection of the wrong
    form, a layer outside the model, or a module kind that matches no module in the blocks the strategy selects (a
    typo would otherwise train on the rest).
    """
    places = dict(strategy.places)
    for name in places:
        if name not in family.towers:
            raise ConfigError(f"{key}.{name}: not a part of this model (its parts: {', '.join(family.towers)})")
    found: dict[str, list[tuple[int, str, str]]] = {name: [] for name in family.towers}
    for module_name, module in model.named_modules():
        if not isinstance(module, family.adaptable):
            continue
        for name, tower in family.towers.items():
            if match := tower.match(module_name):
                found[name].append((int(match[1]) if tower.blocks else 0, module_name, module_name.rsplit(".", 1)[-1]))
                break
    kinds = set(preset.target_modules)
    targets, covered, selects_blocks = [], set(), False
    for name, tower in family.towers.items():
        selection = places.get(name, "none" if tower.blocks else False)
        if isinstance(selection, bool) == tower.blocks:
            form = "a layer selection (all, none, 0.5:1, 12-23 or a list)" if tower.blocks else "true or false"
            raise ConfigError(f"{key}.{name}: takes {form}, not {selection!r}")
        if not found[name]:
            continue
        if not tower.blocks:
            targets += [module for _, module, _ in found[name]] if selection and name in active else []
            continue
        layers = select_layers(selection, max(layer for layer, _, _ in found[name]) + 1, f"{key}.{name}")
        selected = [(module, leaf) for layer, module, leaf in found[name] if layer in layers]
        selects_blocks |= bool(selected)
        covered |= {kind for _, leaf in selected for kind in {leaf} | tower.aliases.get(leaf, set())}
        if name in active:
            targets += [module for module, leaf in selected if leaf in kinds or kinds & tower.aliases.get(leaf, set())]
    unmatched = sorted(kinds - covered)
    if selects_blocks and unmatched:
        raise ConfigError(f"{preset_key}.target_modules: {unmatched[0]!r} matches no module in the blocks {key} "
                          f"selects (their kinds: {', '.join(sorted(covered))})")
    return targets
