"""Z-Image in plain PyTorch, with no ComfyUI import: checkpoints, the transformer, and (to come) text encoding,
sampling and the VAE. Run `python -m zimage_core --help` for the command line."""
