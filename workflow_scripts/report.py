"""Render results/reports/ablation.html from the stages' JSON outputs."""

from lowrank_core.report import write_report
from lowrank_core.runtime import run_step

run_step(lambda: write_report(snakemake.output[0], dict(snakemake.input.items()), snakemake.params.config_hash,
                              snakemake.scriptdir, snakemake.params.baseline, snakemake.params.modality),
         snakemake.log[0], snakemake.resources.torch_threads)
