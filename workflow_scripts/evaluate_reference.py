"""Evaluate a reference model (the untrained base or the full fine-tune teacher) like the LoRA arms."""

from lowrank_core.lora import ArmConfig
from lowrank_core.lora_eval import evaluate_reference
from lowrank_core.runtime import run_step

run_step(lambda: evaluate_reference(snakemake.input.model, snakemake.input.manifest,
                                    ArmConfig.from_dict(snakemake.params.arm), snakemake.input.get("teacher"),
                                    snakemake.output[0], snakemake.params.batch_size),
         snakemake.log[0], snakemake.resources.torch_threads)
