# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Digests of what gallery embeddings depend on: the weights and preprocessing of an image encoder.

A gallery index and an evaluation cache store the digest of the encoder that made them and refuse queries (or reuse)
from another one. The digest covers every parameter and buffer (rounded to float16, so float32 and float16 loads of
one checkpoint agree), each module's class and configuration, and an image processor's settings. Hashing a large
tower takes about a second, so the result is kept per module and recomputed only when a tensor changes (in place:
its version counter moves; or replaced: its storage moves).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

__all__ = ["gallery_fingerprint", "module_digest", "processor_digest"]

_CACHE_ATTRIBUTE = "_diffusers_cir_digest_cache"


def _state_key(module) -> tuple:
    return tuple(
        (name, tensor.data_ptr(), tensor._version, tuple(tensor.shape), str(tensor.dtype))
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
    )


def module_digest(module, exact: bool = False) -> str:
    """A digest of ``module``'s class, configuration and tensors (see the module docstring); ``exact`` hashes each
    tensor's own bytes and dtype instead of its float16 rounding (a training checkpoint's base must be the same
    weights, not merely close ones)."""
    import torch

    key = (_state_key(module), exact)
    cached = getattr(module, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(_config_text(config).encode())
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype if exact else ''}".encode())
            if tensor.device.type == "meta":
                continue
            values = tensor.detach()
            values = values.to(torch.float16) if values.is_floating_point() and not exact else values
            digest.update(values.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    result = digest.hexdigest()
    object.__setattr__(module, _CACHE_ATTRIBUTE, (key, result))
    return result


_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_diffusers_version", "torch_dtype",
                        "dtype", "architectures", "_commit_hash", "_attn_implementation_autoset", "_use_default_values"}


def _without_ignored_keys(value: Any) -> Any:
    # Composite configs (LLaVA-NeXT, BLIP-2) nest a config per tower, each with its own `dtype` / `_name_or_path`.
    if isinstance(value, dict):
        return {key: _without_ignored_keys(item) for key, item in value.items() if key not in _IGNORED_CONFIG_KEYS}
    return value


def _config_text(config: Any) -> str:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        return repr(config)
    return json.dumps(_without_ignored_keys(config), sort_keys=True, default=repr)


def processor_digest(processor) -> str:
    """A digest of an image processor's (or any preprocessing object's) settings."""
    if hasattr(processor, "to_dict"):
        settings = processor.to_dict()
    elif hasattr(processor, "config"):
        settings = processor.config
    else:
        settings = {key: value for key, value in vars(processor).items() if not key.startswith("_")}
    return hashlib.blake2b(_config_text(settings).encode(), digest_size=16).hexdigest()


def gallery_fingerprint(owner: Any, component_names: Iterable[str]) -> str:
    """The fingerprint of the gallery side of ``owner`` (a pipeline): its named components that are set, in order.

    Two pipelines whose gallery components hold the same weights and preprocessing share it (a gallery encoded by
    CompoDiff's CLIP vision tower serves a LinCIR pipeline with the same tower).
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name in component_names:
        component = getattr(owner, name, None)
        if component is None:
            continue
        if isinstance(component, torch.nn.Module):
            part = module_digest(component)
        else:
            part = processor_digest(component)
        digest.update(f"{name}:{part}\n".encode())
    return digest.hexdigest()
