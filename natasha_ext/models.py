"""The small model zoo the papers train: LeNet-5, an MLP, a small CNN, ResNet-18 with a
1-channel stem, and a fully connected autoencoder.

``get_model(name, in_channels=1, image_size=28, num_classes=10, **kw)`` builds any of them.
Classification models return logits; the autoencoder returns a reconstruction of its input
(flattened, as logits: train it with ``BCEWithLogits`` or MSE on ``sigmoid``) and carries
``task = "reconstruction"`` so the training program picks the right loss.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "LeNet5", "Autoencoder", "resnet18", "get_model", "MODELS", "num_parameters"]

_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "softplus": nn.Softplus,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MLP(nn.Sequential):
    """Flatten -> [Linear -> activation] * len(hidden) -> Linear(num_classes)."""

    task = "classification"

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (128,), num_classes: int = 10,
                 activation: str = "relu"):
        layers = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, image_size, image_size)).numel()


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv -> ReLU -> 2x2 max-pool) and a linear classifier: a few
    thousand parameters, cheap enough for exact Hessian checks and CPU demos."""

    task = "classification"

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 channels: Sequence[int] = (8, 16), activation: str = "relu"):
        super().__init__()
        blocks, c = [], in_channels
        for w in channels:
            blocks += [nn.Conv2d(c, w, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(_flat_features(self.features, in_channels, image_size), num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv5(6) -> pool -> conv5(16) -> pool -> 120 -> 84 -> classes.

    28x28 inputs are padded by 2 in the first convolution so the layer sizes match the original
    32x32 design (16*5*5 = 400 features). ``activation='tanh', pool='avg'`` gives the 1998 network;
    the default ReLU/max-pool is the common modern variant."""

    task = "classification"

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 activation: str = "relu", pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        Pool = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        pad = 2 if image_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), _activation(activation), Pool(2),
            nn.Conv2d(6, 16, 5), _activation(activation), Pool(2))
        flat = _flat_features(self.features, in_channels, image_size)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), _activation(activation),
            nn.Linear(120, 84), _activation(activation),
            nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def resnet18(in_channels: int = 1, num_classes: int = 10, stem: str = "paper", **_ignored) -> nn.Module:
    """torchvision's ResNet-18 with an ``in_channels`` stem and ``num_classes`` outputs.

    ``stem='paper'`` keeps the ImageNet stem (7x7 stride-2 conv + max-pool) with one input channel:
    on MNIST this is the network of the AdaHessian/Hybrid paper, whose count of 11,175,370
    parameters it matches exactly. ``stem='small'`` uses a 3x3 stride-1 conv and no max-pool
    (the usual choice for 28x28/32x32 images; 11,172,810 parameters)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if stem == "paper":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    elif stem == "small":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        raise ValueError(f"stem must be 'paper' or 'small', got {stem!r}")
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.task = "classification"
    return model


class Autoencoder(nn.Module):
    """Fully connected autoencoder: input -> widths -> code -> reversed widths -> input.

    The trust-region paper (Kohler, Adolphs & Lucchi) trains an MNIST/Fashion-MNIST autoencoder
    as its third architecture; its appendix (not in our copy of the paper) fixes the layer sizes.
    The default here is the classic deep MNIST autoencoder of the second-order literature
    (Hinton & Salakhutdinov 2006; Martens 2010): 784-1000-500-250-30, sigmoid hidden units,
    a linear code layer, and logits at the output (``sigmoid`` of the output is the image).
    ``widths``/``code`` shrink it for quick runs."""

    task = "reconstruction"

    def __init__(self, in_features: int = 784, widths: Sequence[int] = (1000, 500, 250), code: int = 30,
                 activation: str = "sigmoid"):
        super().__init__()
        enc, w = [nn.Flatten()], in_features
        for h in widths:
            enc += [nn.Linear(w, h), _activation(activation)]
            w = h
        enc.append(nn.Linear(w, code))                      # linear code layer
        dec, w = [], code
        for h in reversed(tuple(widths)):
            dec += [nn.Linear(w, h), _activation(activation)]
            w = h
        dec.append(nn.Linear(w, in_features))               # logits of the reconstruction
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _mlp(in_channels, image_size, num_classes, **kw):
    return MLP(in_channels * image_size * image_size, num_classes=num_classes, **kw)


def _autoencoder(in_channels, image_size, num_classes, **kw):
    return Autoencoder(in_channels * image_size * image_size, **kw)


#: name -> builder(in_channels, image_size, num_classes, **kw)
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "small-cnn": lambda c, s, k, **kw: SmallCNN(c, s, k, **kw),
    "lenet5": lambda c, s, k, **kw: LeNet5(c, s, k, **kw),
    "resnet18": lambda c, s, k, **kw: resnet18(c, k, **kw),
    "autoencoder": _autoencoder,
}


def get_model(name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **kw) -> nn.Module:
    """Build a zoo model by name (see :data:`MODELS`); extra keywords go to its constructor."""
    key = name.lower().replace("_", "-")
    aliases = {"lenet": "lenet5", "lenet-5": "lenet5", "cnn": "small-cnn", "smallcnn": "small-cnn",
               "resnet-18": "resnet18", "ae": "autoencoder"}
    key = aliases.get(key, key)
    if key not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[key](in_channels, image_size, num_classes, **kw)
