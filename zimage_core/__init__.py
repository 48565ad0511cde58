"""Z-Image in plain PyTorch, with no ComfyUI import: checkpoints, the transformer, text encoding, the VAE,
sampling and the pipeline. `python -m zimage_core --help` for the command line, `python -m zimage_core.client` to
queue workflows on a ComfyUI server."""
