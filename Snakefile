"""Low-rank / LoRA ablation study on a vision-language model: see README.md and DESIGN.md."""

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


try:
    validate(config, "config/schema.yaml", set_default=True)
except WorkflowError as error:
    invalid = error.__context__  # the jsonschema ValidationError: report it as one line naming the key
    key = ".".join(map(str, invalid.absolute_path)) or "(top level)"
    raise WorkflowError(f"invalid config at {key}: {invalid.message}") from None


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/dataset.smk"
include: "rules/features.smk"
include: "rules/head.smk"
include: "rules/lowrank.smk"
include: "rules/teacher.smk"
include: "rules/lora.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/reports/ablation.html",
