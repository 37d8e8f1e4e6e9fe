"""timm backbones that return the C2..C5 stages (strides 4, 8, 16, 32: :data:`mcl.geometry.STRIDES`) as NCHW
tensors."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn

from mcl.geometry import STRIDES

# A Swin small enough for CPU tests: same family and code path as swin_tiny, a fraction of the width and depth.
SWIN_TEST_KWARGS = {"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 4)}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_test": ("swin_tiny_patch4_window7_224", SWIN_TEST_KWARGS),
}


def pool(c5: torch.Tensor) -> torch.Tensor:
    """Global average pooling of ``(B, C, H, W)`` maps to ``(B, C)``: :meth:`Backbone.forward_pooled`'s pooling."""
    return c5.mean(dim=(2, 3))


class Backbone(nn.Module):
    """A timm model in ``features_only`` mode returning ``[C2, C3, C4, C5]``, each ``(B, C_k, H/s_k, W/s_k)``.

    Swin returns NHWC feature maps; they are permuted to NCHW here so that every consumer sees NCHW.

    With ``channels_last`` the weights are kept in ``torch.channels_last`` memory format and every input is made
    channels-last before the first conv: the same NCHW shapes and values, stored channel-fastest (NHWC), which
    GPU convolutions under mixed precision run without layout transposes. The state-dict keys do not change and the
    weights load into a backbone without the option (``load_state_dict`` copies into each tensor's own layout).
    """

    def __init__(
        self,
        name: str = "resnet18",
        image_size: int = 224,
        pretrained: bool = False,
        channels_last: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        timm_name, alias_kwargs = ALIASES.get(name, (name, {}))
        kwargs = {**alias_kwargs, **kwargs}
        self.name = name
        if not timm.is_model(timm_name):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; close timm names: {', '.join(close)}" if close else ""
            raise ValueError(
                f"backbone.name={name!r} is not a timm model{hint} (or one of {sorted(ALIASES)}); "
                "any timm ResNet or Swin works"
            )
        self.is_swin = timm_name.startswith("swin")
        if self.is_swin:
            kwargs.setdefault("img_size", image_size)
        probe = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs)
        reductions = probe.feature_info.reduction()
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature stages at strides {missing}; MCL needs C2..C5")
        out_indices = tuple(reductions.index(s) for s in STRIDES)
        self.model = timm.create_model(
            timm_name, pretrained=pretrained, features_only=True, out_indices=out_indices, **kwargs
        )
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.model(images)
        if self.is_swin:
            # An NHWC map permuted to NCHW is already channels-last: contiguous() then copies nothing.
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            features = [f.permute(0, 3, 1, 2).contiguous(memory_format=layout) for f in features]
        return features

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled C5, ``(B, C5)``: the feature the kNN monitor and linear probe use."""
        return pool(self(images)[-1])
