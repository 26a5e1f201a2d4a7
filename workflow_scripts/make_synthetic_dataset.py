"""Generate the modality's synthetic dataset (tamper detection images; ETH3D-layout facade scenes)."""

from lowrank_core.modalities import get_modality
from lowrank_core.runtime import run_step

run_step(lambda: get_modality(snakemake.params.modality).generate_synthetic(snakemake.output[0],
                                                                             snakemake.params.synthetic),
         snakemake.log[0], snakemake.resources.torch_threads)
