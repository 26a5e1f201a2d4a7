"""Build the tiny random-weight Qwen2.5-VL of the embedded default."""

from lowrank_core.modeling import TinyModelSpec, build_tiny_model
from lowrank_core.runtime import run_step

run_step(lambda: build_tiny_model(snakemake.output[0], TinyModelSpec.from_dict(snakemake.params.tiny)),
         snakemake.log[0], snakemake.resources.torch_threads)
