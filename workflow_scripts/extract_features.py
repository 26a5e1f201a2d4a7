"""Encode one split's images and cache the vision-token features."""

from lowrank_core.features import FeatureConfig, extract_features
from lowrank_core.runtime import run_step

run_step(lambda: extract_features(snakemake.input.model, snakemake.input.manifest, snakemake.wildcards.split,
                                  FeatureConfig.from_dict(snakemake.params.features), snakemake.params.model_dtype,
                                  snakemake.output.features, snakemake.output.stats),
         snakemake.log[0], snakemake.resources.torch_threads)
