"""Full fine-tune of the base model, data-parallel over `resources.gpu` processes when that is above 1;
resumable checkpoints live in the state directory, not in the output."""

from lowrank_core.distributed import launch
from lowrank_core.lora import ArmConfig
from lowrank_core.runtime import run_step
from lowrank_core.teacher import train_teacher
from lowrank_core.training import TrainConfig

run_step(lambda: launch(train_teacher, snakemake.input.model, snakemake.input.manifest,
                        TrainConfig.from_dict(snakemake.params.teacher), ArmConfig.from_dict(snakemake.params.task),
                        snakemake.output[0], snakemake.params.state_dir, snakemake.params.tensorboard_dir,
                        processes=max(1, snakemake.resources.gpu)),
         snakemake.log[0], snakemake.resources.torch_threads)
