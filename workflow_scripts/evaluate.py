"""Evaluate one trained LoRA arm on the test split."""

from lowrank_core.lora import ArmConfig
from lowrank_core.lora_eval import evaluate_arm
from lowrank_core.runtime import run_step

run_step(lambda: evaluate_arm(snakemake.input.model, snakemake.input.manifest, ArmConfig.from_dict(snakemake.params.arm),
                              snakemake.input.arm, snakemake.input.teacher, snakemake.output[0],
                              snakemake.params.target_loss, snakemake.params.batch_size, snakemake.input.get("head")),
         snakemake.log[0], snakemake.resources.torch_threads)
