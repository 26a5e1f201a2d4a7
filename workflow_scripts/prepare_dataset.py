"""Validate every record (of the model's modality) and write the dataset manifest."""

from lowrank_core.data import DatasetConfig
from lowrank_core.modalities import get_modality
from lowrank_core.runtime import run_step

run_step(lambda: get_modality(snakemake.params.modality).prepare_dataset(
    DatasetConfig.from_dict(snakemake.params.dataset), snakemake.input[0], snakemake.output[0]),
         snakemake.log[0], snakemake.resources.torch_threads)
