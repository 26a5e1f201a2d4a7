"""Check the base model checkpoint and describe it in model.json."""

from lowrank_core.modeling import ModelConfig, prepare_model
from lowrank_core.runtime import run_step

run_step(lambda: prepare_model(ModelConfig.from_dict(snakemake.params.model), snakemake.input[0], snakemake.output[0]),
         snakemake.log[0], snakemake.resources.torch_threads)
