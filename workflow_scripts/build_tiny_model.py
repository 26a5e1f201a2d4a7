"""Build the tiny random-weight model of the embedded default (the modality's: a Qwen2.5-VL, a Depth Anything)."""

from lowrank_core.modalities import get_modality
from lowrank_core.runtime import run_step

run_step(lambda: get_modality(snakemake.params.modality).build_tiny(snakemake.output[0], snakemake.params.tiny),
         snakemake.log[0], snakemake.resources.torch_threads)
