"""Train one LoRA arm, data-parallel over `resources.gpu` processes when that is above 1; resumable checkpoints
live in the state directory, not in the output."""

from lowrank_core.distributed import launch
from lowrank_core.lora import ArmConfig, train_lora
from lowrank_core.runtime import run_step

run_step(lambda: launch(train_lora, snakemake.input.model, snakemake.input.manifest,
                        ArmConfig.from_dict(snakemake.params.arm), snakemake.output[0], snakemake.params.state_dir,
                        snakemake.params.tensorboard_dir, snakemake.input.get("head"), snakemake.input.get("delta"),
                        processes=max(1, snakemake.resources.gpu)),
         snakemake.log[0], snakemake.resources.torch_threads)
