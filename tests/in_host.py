"""What the scripts the server tests run in a ComfyUI host's own python (from the host's folder) share: ComfyUI's
arguments as the test servers set them, and this pack imported as `zimage_pack`, as ComfyUI imports a custom node."""

import importlib.util
import sys
from pathlib import Path


def setup(pack: Path, flags: tuple[str, ...] = ()):
    """`--cpu` where there is no GPU (the servers run with it), `flags` set (`args` names), then the pack."""
    sys.argv = sys.argv[:1]
    sys.path.insert(0, ".")
    import torch
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    for flag in flags:
        setattr(args, flag, True)
    spec = importlib.util.spec_from_file_location("zimage_pack", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["zimage_pack"] = module
    spec.loader.exec_module(module)


def inputs(cfg):
    """The seeded latent (1, C, 32, 32) and caption features (1, 20, D) every script predicts from."""
    import torch

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_channels, 32, 32, generator=generator)
    return x, torch.randn(1, 20, cfg.cap_feat_dim, generator=generator)
