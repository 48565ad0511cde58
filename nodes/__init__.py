"""ComfyUI glue: thin node classes over `zimage_core`, registered here.

The node set (loaders, text encode, sampler, VAE, edit conditioning) is not built yet; until it is, the pack
registers no nodes rather than placeholders.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
