"""Validate every record (of the model's modality; against the model's tokenizer where it reads one) and write the
dataset manifest."""

from lowrank_core.data import DatasetConfig
from lowrank_core.modalities import get_modality
from lowrank_core.runtime import run_step

inputs, params = snakemake.input, snakemake.params
reads_model = {"model_info_json": inputs.model, "task": params.task} if "model" in inputs.keys() else {}
run_step(lambda: get_modality(params.modality).prepare_dataset(
    DatasetConfig.from_dict(params.dataset), inputs[0], snakemake.output[0], **reads_model),
         snakemake.log[0], snakemake.resources.torch_threads)
