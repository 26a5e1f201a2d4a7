"""Compare one trained projection net with the per-sample truncated SVD on the test split."""

from lowrank_core.lowrank import LowrankConfig, compare_with_svd
from lowrank_core.runtime import run_step

run_step(lambda: compare_with_svd(snakemake.wildcards.arch, snakemake.input.weights, snakemake.input.test,
                                  LowrankConfig.from_dict(snakemake.params.lowrank), snakemake.output.comparison,
                                  snakemake.output.spatial),
         snakemake.log[0], snakemake.resources.torch_threads)
