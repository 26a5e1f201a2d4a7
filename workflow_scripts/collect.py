"""Gather every arm's evaluation and history, and the references, into the ablation tables."""

from pathlib import Path

from lowrank_core.runtime import run_step
from lowrank_core.tables import collect

run_step(lambda: collect(snakemake.params.arms, snakemake.input.evaluations,
                         [Path(arm) / "history.csv" for arm in snakemake.input.histories],
                         dict(zip(snakemake.params.references, snakemake.input.references)),
                         snakemake.output.table, snakemake.output.references, snakemake.output.history,
                         snakemake.output.module_distance, snakemake.params.modality),
         snakemake.log[0], snakemake.resources.torch_threads)
