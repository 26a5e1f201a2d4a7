"""Config dataclasses and the JSON schema: bad values fail with a message naming the key."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from lowrank_core.config import Section
from lowrank_core.data import DatasetConfig
from lowrank_core.delta import DeltaConfig
from lowrank_core.errors import ConfigError
from lowrank_core.features import FeatureConfig
from lowrank_core.head import HeadConfig
from lowrank_core.lowrank import LowrankConfig
from lowrank_core.modeling import ModelConfig
from lowrank_core.training import TrainConfig

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
SECTIONS = {"model": ModelConfig, "dataset": DatasetConfig, "features": FeatureConfig, "head": HeadConfig,
            "lowrank": LowrankConfig, "teacher": TrainConfig, "delta": DeltaConfig}


@pytest.mark.parametrize(
    "cls, data, message",
    [
        (FeatureConfig, {"batch_sise": 8}, "features.batch_sise: unknown key"),
        (FeatureConfig, {"batch_size": "8"}, "features.batch_size: expected int, got str"),
        (FeatureConfig, {"batch_size": True}, "features.batch_size: expected int, got bool"),
        (FeatureConfig, {"batch_size": 0}, "features.batch_size: must be at least 1"),
        (FeatureConfig, {"dtype": "int8"}, "features.dtype: 'int8' is not one of"),
        (ModelConfig, {"tiny": {"vision_depth": "2"}}, "model.tiny.vision_depth: expected int"),
        (ModelConfig, {"tiny": {"text_hidden_size": 60, "text_heads": 4}}, "model.tiny.text_hidden_size: head dim"),
        (ModelConfig, {"source": "tiny", "modality": "text"}, "model.source: there is no tiny text model"),
        (DatasetConfig, {"splits": {"train": "a.json"}}, "dataset.splits: must name exactly train, val, test"),
        (DatasetConfig, {"synthetic": {"train": 1}}, "dataset.synthetic.train: must be at least 2"),
        (DatasetConfig, {"synthetic": {"splice_fraction": 1.5}}, "dataset.synthetic.splice_fraction: must be in"),
        (DatasetConfig, {"synthetic": {"camera_noise": [24, 3]}},
         "dataset.synthetic.camera_noise: must be two noise levels"),
    ],
)
def test_bad_values_name_their_key(cls, data, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        cls.from_dict(data)


def test_ints_are_accepted_for_floats_and_defaults_fill_in():
    spec = DatasetConfig.from_dict({"synthetic": {"splice_fraction": 1}})
    assert spec.synthetic.splice_fraction == 1.0 and isinstance(spec.synthetic.splice_fraction, float)
    assert spec.synthetic.train == 320 and spec.source == "synthetic"


def test_required_fields_are_reported():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class NeedsRank(Section):
        key = "lora"
        rank: int

    with pytest.raises(ConfigError, match=r"^lora\.rank: required key is missing"):
        NeedsRank.from_dict({})


def test_schema_defaults_agree_with_the_dataclasses():
    config = {}
    validate(config, str(SCHEMA), set_default=True)
    for name, cls in SECTIONS.items():
        assert config[name] == _plain(cls.from_dict({}).to_dict()), name


def test_embedded_default_passes_schema_and_dataclasses():
    config = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    validate(config, str(SCHEMA), set_default=True)
    for name, cls in SECTIONS.items():
        cls.from_dict(config[name])


@pytest.mark.parametrize(
    "edit, path",
    [
        (lambda c: c["features"].update(batch_sise=8), "features"),
        (lambda c: c["features"].update(batch_size="x"), "features.batch_size"),
        (lambda c: c["model"]["tiny"].update(vision_depth=0), "model.tiny.vision_depth"),
        (lambda c: c.update(bogus=1), ""),
        (lambda c: c["resources"].update(train_everything={"gpu": 1}), "resources"),
        (lambda c: c["resources"]["default"].update(gpus=1), "resources.default"),
        (lambda c: c["lowrank"].update(archs=["MLP", "Transformer"]), "lowrank.archs.1"),
        (lambda c: c["lowrank"].update(rank=0), "lowrank.rank"),
        (lambda c: c["head"].update(loc_loss="focal"), "head.loc_loss"),
        (lambda c: c["teacher"].update(mixed_precision="fp8"), "teacher.mixed_precision"),
        (lambda c: c["teacher"].update(sharding="zero3"), "teacher.sharding"),
        (lambda c: c["lora"]["train"].update(sharding="fsdp"), "lora.train.sharding"),
        (lambda c: c["delta"].update(ranks=[8, 8]), "delta.ranks"),
        (lambda c: c["delta"].update(alpha=0), "delta.alpha"),
    ],
)
def test_schema_rejects_bad_config(edit, path):
    import jsonschema

    config = copy.deepcopy(yaml.safe_load((SCHEMA.parent / "config.yaml").read_text()))
    edit(config)
    with pytest.raises(Exception) as caught:
        validate(config, str(SCHEMA), set_default=True)
    invalid = caught.value.__context__
    assert isinstance(invalid, jsonschema.ValidationError)
    assert ".".join(map(str, invalid.absolute_path)) == path


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
