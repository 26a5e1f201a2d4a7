"""Train one projection net (the `arch` wildcard); resumes from its state directory."""

from pathlib import Path

from lowrank_core.lowrank import LowrankConfig, train_projection
from lowrank_core.runtime import run_step

run_step(lambda: train_projection(snakemake.wildcards.arch, snakemake.input.train, snakemake.input.val,
                                  LowrankConfig.from_dict(snakemake.params.lowrank),
                                  Path(snakemake.output.weights).parent, snakemake.params.state_dir),
         snakemake.log[0], snakemake.resources.torch_threads)
