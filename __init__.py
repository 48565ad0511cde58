"""ComfyUI loads this file; it registers the pack's nodes when the host is there and stays light otherwise.

Outside ComfyUI (pytest, `python -m zimage_core`) importing it pulls in nothing: no host, no torch.
"""

import importlib.util

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
