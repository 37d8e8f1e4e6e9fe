"""Weight initialisation schemes: the frameworks' defaults, or the released code's.

``default`` keeps what timm and torchvision build: timm's ResNet (kaiming-normal fan-out convs, the last BN of each
block zero-initialised), torchvision's FPN (kaiming-uniform, ``a=1``) and ``nn.Linear``/``nn.Conv2d`` defaults for
the head, projector and predictors. ``official`` is the released code's (OpenSelfSup, mmcv initialisers):

================  ===============================================================  ==========================
part              rule                                                             e.g. std (ResNet-50)
================  ===============================================================  ==========================
backbone convs    kaiming-normal, fan-in, ReLU gain; every BN weight 1, bias 0     stem 0.117
                  (no zero-init of the last BN of a block)
neck convs        xavier-uniform, bias 0                                           C5 lateral 0.0295
head convs        kaiming-normal, fan-out, ReLU gain                               0.0295
projector Linear  kaiming-normal, fan-in, ReLU gain, bias 0                        first 0.088
predictor Linear  normal(0, 0.01), bias 0                                          0.01
================  ===============================================================  ==========================

Every BatchNorm of neck, head, projector and predictors starts at weight 1, bias 0 under both schemes.
The backbone rule touches convolutions and BatchNorms only, so on Swin it changes just the patch embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

WEIGHT_INITS = ("default", "official")
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)


def check_weight_init(name: str) -> str:
    if name not in WEIGHT_INITS:
        raise ValueError(f"weight_init={name!r} is invalid: use one of {WEIGHT_INITS}")
    return name


def _initialise(module: nn.Module, kind: type[nn.Module], init_weight: Callable[[nn.Parameter], object]) -> None:
    """``init_weight`` on the weight of every ``kind`` layer in ``module`` (biases 0), and norms to weight 1, bias 0."""
    for layer in module.modules():
        if isinstance(layer, kind):
            init_weight(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, NORMS) and layer.weight is not None:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def official_trunk_init(backbone: nn.Module, neck: nn.Module, head: nn.Module) -> None:
    """The released code's initialisation of backbone, neck and tile head (see the module docstring)."""
    _initialise(backbone, nn.Conv2d, lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"))
    _initialise(neck, nn.Conv2d, nn.init.xavier_uniform_)
    _initialise(head, nn.Conv2d, lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"))


def official_embedding_init(projector: nn.Module, predictors: Iterable[nn.Module]) -> None:
    """The released code's initialisation of the projector (kaiming fan-in) and the predictors (normal, std 0.01)."""
    _initialise(projector, nn.Linear, lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"))
    for predictor in predictors:
        _initialise(predictor, nn.Linear, lambda w: nn.init.normal_(w, std=0.01))
