"""Activation functions of the adapters (AdaMix's bottleneck adapters, MoA's parallel adapter), by option name."""

import torch
from torch.nn import functional as F

ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
