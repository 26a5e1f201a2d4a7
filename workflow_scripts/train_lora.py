"""Train one LoRA arm once per seed (data-parallel over `resources.gpu` processes when that is above 1) and evaluate
each on the test split; resumable checkpoints live in the state directories, not in the outputs."""

from pathlib import Path

from lowrank_core.distributed import launch
from lowrank_core.lora import ArmConfig, train_lora
from lowrank_core.lora_eval import evaluate_arm
from lowrank_core.runtime import run_step


def train_and_evaluate_seeds():
    inputs, params = snakemake.input, snakemake.params
    init_dir = Path(params.state_dirs[0]).parent / "init"  # a data-driven init's preprocessing, shared by the seeds
    for seed, arm_dir, metrics_json, state_dir, tensorboard_dir in zip(
            params.seeds, snakemake.output.arms, snakemake.output.evaluations, params.state_dirs,
            params.tensorboard_dirs):
        arm = ArmConfig.from_dict({**params.arm, "seed": seed})
        launch(train_lora, inputs.model, inputs.manifest, arm, arm_dir, state_dir, tensorboard_dir,
               inputs.get("head"), inputs.get("delta"), init_dir, processes=max(1, snakemake.resources.gpu))
        evaluate_arm(inputs.model, inputs.manifest, arm, arm_dir, inputs.teacher, metrics_json, params.target_loss,
                     params.batch_size, inputs.get("head"), inputs.get("general_text"))


run_step(train_and_evaluate_seeds, snakemake.log[0], snakemake.resources.torch_threads)
