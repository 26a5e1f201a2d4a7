"""Stream ΔW = W_teacher − W_base from the two checkpoints and write its SVD analysis and LoRA factors."""

from lowrank_core.delta import DeltaConfig, export_delta
from lowrank_core.runtime import run_step

run_step(lambda: export_delta(snakemake.params.base_dir, snakemake.input.teacher, snakemake.output[0],
                              DeltaConfig.from_dict(snakemake.params.delta)),
         snakemake.log[0], snakemake.resources.torch_threads)
