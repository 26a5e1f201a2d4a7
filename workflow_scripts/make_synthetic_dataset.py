"""Generate the synthetic splice / copy-move tamper-detection dataset."""

from lowrank_core.data import SyntheticSpec, generate_synthetic
from lowrank_core.runtime import run_step

run_step(lambda: generate_synthetic(snakemake.output[0], SyntheticSpec.from_dict(snakemake.params.synthetic)),
         snakemake.log[0], snakemake.resources.torch_threads)
