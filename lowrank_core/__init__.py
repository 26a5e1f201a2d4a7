"""lowrank_core: the library behind the low-rank / LoRA ablation workflow (no snakemake imports)."""

__version__ = "0.1.0"
