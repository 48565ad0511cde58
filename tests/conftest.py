import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SMALL, reference_transformer, write_diffusers_folder


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def small_ref():
    """diffusers' transformer in the SMALL config (real head size and RoPE) with seeded random weights."""
    return reference_transformer(SMALL, seed=1)


@pytest.fixture(scope="session")
def small_folder(small_ref, tmp_path_factory):
    """The SMALL reference saved by diffusers as a sharded folder with an index."""
    return write_diffusers_folder(tmp_path_factory.mktemp("small") / "transformer", small_ref, "300KB")
