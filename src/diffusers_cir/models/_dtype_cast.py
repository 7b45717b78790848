# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Dtype helpers of our models: layerwise casting's compute dtype, and one false warning of diffusers 0.42 silenced.

`ModelMixin.to` warns "There are modules in X that should be kept in float32: []. Casting directly with `to()` can
lead to inconsistent results" on every cast to a dtype, for every model: it reads `self._keep_in_fp32_modules or []`
and then tests the list against `None`, which never holds. Our models keep no module in float32, so the warning (with
its empty list) only misleads. This drops exactly that record while our models are being cast; any other message of
`to()`, and the warning of a model that does list modules, goes through.
"""

from __future__ import annotations

import logging

import torch

_LOGGER_NAME = "diffusers.models.modeling_utils"


class _EmptyKeepInFloat32Warning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in ") and "should be kept in float32: []." in message)


_FILTER = _EmptyKeepInFloat32Warning()


class QuietDtypeCastMixin:
    """Put before `ModelMixin` in the bases: `to()` without the empty-list float32 warning."""

    def to(self, *args, **kwargs):
        logger = logging.getLogger(_LOGGER_NAME)
        logger.addFilter(_FILTER)
        try:
            return super().to(*args, **kwargs)
        finally:
            logger.removeFilter(_FILTER)


def compute_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype `layer` computes in: its weight's, or the compute dtype of diffusers' layerwise casting
    (`ModelMixin.enable_layerwise_casting`), which keeps the weight in a storage dtype such as float8 between calls and
    casts it only while the layer runs. Inputs cast to the weight's dtype outside the call would be cast to float8."""
    registry = getattr(layer, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    if hook is not None:
        return hook.compute_dtype
    weight = getattr(layer, "weight", None)
    # layers without a float weight (the int8 CPU layers of `cpu_int8`) say what they compute in
    return weight.dtype if isinstance(weight, torch.Tensor) else layer.compute_dtype


def layerwise_casting_enabled(model) -> bool:
    """Whether any layer of `model` is under diffusers' layerwise casting (its weight read outside the layer's own
    call is in the storage dtype: kernels that read weights directly cannot run)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            return True
    return False
