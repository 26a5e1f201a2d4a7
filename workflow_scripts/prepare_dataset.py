"""Validate every annotation record (of the model's modality) and write the dataset manifest."""

from lowrank_core.data import DatasetConfig, prepare_dataset
from lowrank_core.runtime import run_step

run_step(lambda: prepare_dataset(DatasetConfig.from_dict(snakemake.params.dataset), snakemake.input[0],
                                 snakemake.output[0], snakemake.params.modality),
         snakemake.log[0], snakemake.resources.torch_threads)
