"""Low-rank / LoRA ablation study on a vision-language model: see README.md and DESIGN.md."""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


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
