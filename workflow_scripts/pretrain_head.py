"""Pre-train the detection head on the cached features of the three splits."""

from pathlib import Path

from lowrank_core.head import HeadConfig, pretrain_head
from lowrank_core.runtime import run_step

run_step(lambda: pretrain_head(snakemake.input.train, snakemake.input.val, snakemake.input.test,
                               HeadConfig.from_dict(snakemake.params.head), Path(snakemake.output.metrics).parent),
         snakemake.log[0], snakemake.resources.torch_threads)
