"""The depth modality: multi-view depth estimation on ETH3D-format scenes."""
