"""Evaluate the reference models like the LoRA arms: the untrained base, the full fine-tune teacher, and the base
with the teacher's ΔW_r merged (teacher_r{r}) for every exported rank."""

from pathlib import Path

from lowrank_core.lora import ArmConfig
from lowrank_core.lora_eval import evaluate_reference
from lowrank_core.runtime import run_step


def evaluate_references():
    inputs, params = snakemake.input, snakemake.params
    arm = ArmConfig.from_dict(params.arm)
    for reference, out_json in zip(params.references, snakemake.output.evaluations):
        rank = reference.removeprefix("teacher_r") if reference.startswith("teacher_r") else None
        evaluate_reference(inputs.model, inputs.manifest, arm, inputs.teacher if reference == "teacher" else None,
                           out_json, params.batch_size,
                           Path(inputs.delta) / f"factors_r{rank}.safetensors" if rank else None,
                           inputs.get("general_text"))


run_step(evaluate_references, snakemake.log[0], snakemake.resources.torch_threads)
