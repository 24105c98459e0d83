"""One place to seed every generator a stage touches."""
import os
import random

import numpy as np
import torch


def seed_generators(seed: int) -> None:
    """Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_everything(seed: int) -> None:
    """The generators, and PYTHONHASHSEED for any process this one starts with a fresh interpreter."""
    seed_generators(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
