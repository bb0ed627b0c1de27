"""Networks that map inputs to logits. Dataset plugins pick one as their default."""

from __future__ import annotations

from torch import nn


def linear(in_features: int, n_outputs: int, bias: bool = True) -> nn.Module:
    """A single linear layer (the paper's synthetic experiments use it without bias)."""
    return nn.Linear(in_features, n_outputs, bias=bias)


def mlp(
    in_features: int,
    n_outputs: int,
    hidden: tuple[int, ...] = (300, 300),
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Module:
    """A multilayer perceptron with the given hidden widths."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)
