# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Silence one false warning of diffusers 0.42 on dtype casts.

`ModelMixin.to` warns "There are modules in X that should be kept in float32: []. Casting directly with `to()` can
lead to inconsistent results" on every cast to a dtype, for every model: it reads `self._keep_in_fp32_modules or []`
and then tests the list against `None`, which never holds. Our models keep no module in float32, so the warning (with
its empty list) only misleads. This drops exactly that record while our models are being cast; any other message of
`to()`, and the warning of a model that does list modules, goes through.
"""

from __future__ import annotations

import logging

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
