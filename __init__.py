"""ComfyUI loads this file: it registers the pack's nodes when the host is there and stays light otherwise.

The nodes use ComfyUI's V3 schema, found through `comfy_entrypoint` (a `NODE_CLASS_MAPPINGS` here would hide it).
Outside ComfyUI (pytest, `python -m zimage_core`) importing this pulls in nothing: no host, no torch.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
