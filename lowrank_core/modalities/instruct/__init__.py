"""Instruction fine-tuning of a causal LM (`model.modality: instruct`): the modality, its tiny base model and its
report section."""
