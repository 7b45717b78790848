# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""LoRA for CompoDiff pipelines: load, save, fuse, unfuse and unload LoRA adapters of the denoiser.

Built on diffusers' :class:`~diffusers.loaders.lora_base.LoraBaseMixin` (fusing, unfusing, adapter switching and the
on-disk format all come from there). Two things are specific to this package:

* files are accepted both as a pipeline-level save (keys prefixed with ``transformer.``, what
  :meth:`CompoDiffLoraLoaderMixin.save_lora_weights` and the training script write) and as a model-level save
  (``CompoDiffTransformer.save_lora_adapter``, no prefix). diffusers 0.42's ``load_lora_adapter`` silently loads
  nothing from a model-level file with its default ``prefix="transformer"``, so the prefix is resolved here and the
  adapter is loaded with ``prefix=None``;
* a file that matches no layer of the denoiser is an error, never a silent no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import logging

logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"


def _strip_transformer_prefix(values: dict | None, what: str) -> dict | None:
    """Remove the pipeline-level ``transformer.`` prefix from state-dict (or metadata) keys; model-level saves have
    none. Any other prefix means the file is not a CompoDiff LoRA."""
    if values is None:
        return None
    prefix = f"{TRANSFORMER_NAME}."
    prefixed = [key for key in values if key.startswith(prefix)]
    if not prefixed:
        return dict(values)
    if len(prefixed) != len(values):
        others = sorted(key for key in values if not key.startswith(prefix))
        raise ValueError(
            f"This LoRA {what} mixes `{prefix}*` keys with {len(others)} other keys (e.g. {others[:3]}); a CompoDiff "
            "LoRA holds only denoiser (transformer) layers."
        )
    return {key[len(prefix) :]: value for key, value in values.items()}


class CompoDiffLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load LoRA adapters into the [`CompoDiffTransformer`] of a [`CompoDiffPipeline`], save them, fuse them into the
    weights and unload them.

    Example:
        ```py
        >>> pipe.load_lora_weights("my-compodiff-lora")  # a folder with pytorch_lora_weights.safetensors
        >>> pipe.fuse_lora(lora_scale=1.0)  # bake it into the weights (faster inference)
        >>> pipe.unfuse_lora()
        >>> pipe.unload_lora_weights()  # back to the base model
        ```
    """

    _lora_loadable_modules = [TRANSFORMER_NAME]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, **kwargs):
        """The LoRA state dict (and, with ``return_lora_metadata=True``, its ``LoraConfig`` metadata) of a folder, a
        file, a Hub repo id or a dict, with the ``transformer.`` prefix removed.

        Keyword arguments: ``weight_name``, ``subfolder``, ``use_safetensors`` (default ``True``), ``cache_dir``,
        ``force_download``, ``proxies``, ``local_files_only``, ``token``, ``revision``, ``return_lora_metadata``.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", True)
        path = pretrained_model_name_or_path_or_dict
        weight_name = kwargs.pop("weight_name", None)
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            path, weight_name = os.path.dirname(os.fspath(path)) or ".", os.path.basename(os.fspath(path))
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=path,
            weight_name=weight_name,
            use_safetensors=use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=not use_safetensors,
        )
        if kwargs:
            raise TypeError(f"lora_state_dict got unexpected keyword arguments {sorted(kwargs)}.")
        state_dict = _strip_transformer_prefix(state_dict, "file")
        metadata = _strip_transformer_prefix(metadata, "metadata")
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Load a LoRA adapter into ``self.transformer``.

        Args:
            pretrained_model_name_or_path_or_dict: a folder holding ``pytorch_lora_weights.safetensors`` (or the file
                named by ``weight_name``), the file itself, a Hub repo id, or a state dict.
            adapter_name (`str`, *optional*): Name of the adapter (``default_0``, ``default_1``, ... when omitted);
                several adapters can be loaded and combined with ``set_adapters``.
            hotswap (`bool`, defaults to `False`): Replace the weights of the already loaded adapter ``adapter_name``
                in place.
            kwargs: passed to :meth:`lora_state_dict`.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not state_dict:
            raise ValueError(f"No LoRA weights found in {pretrained_model_name_or_path_or_dict!r}.")
        not_lora = [key for key in state_dict if "lora" not in key]
        if not_lora:
            raise ValueError(
                f"Invalid LoRA checkpoint: {len(not_lora)} keys are not LoRA weights (e.g. {not_lora[:3]}); every key "
                "must contain 'lora'."
            )
        self.load_lora_into_transformer(
            state_dict, self.transformer, adapter_name=adapter_name, metadata=metadata, _pipeline=self, hotswap=hotswap
        )

    @classmethod
    def load_lora_into_transformer(
        cls, state_dict, transformer, adapter_name=None, _pipeline=None, hotswap: bool = False, metadata=None
    ):
        """Inject a (prefix-free) LoRA state dict into a :class:`CompoDiffTransformer` and check that it landed."""
        before = set(getattr(transformer, "peft_config", {}) or {})
        transformer.load_lora_adapter(
            state_dict,
            prefix=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            hotswap=hotswap,
        )
        after = set(getattr(transformer, "peft_config", {}) or {})
        if not hotswap and after == before:
            layers = sorted({key.split(".lora_")[0] for key in state_dict})
            raise ValueError(
                f"The LoRA weights match no layer of the {type(transformer).__name__} (their layers: {layers[:5]}"
                f"{' ...' if len(layers) > 5 else ''}); nothing was loaded."
            )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ):
        """Save the LoRA weights of the denoiser (as returned by ``peft.get_peft_model_state_dict``) in the
        pipeline-level format that :meth:`load_lora_weights` reads (``transformer.`` prefix, ``LoraConfig`` metadata).

        Args:
            save_directory: where ``pytorch_lora_weights.safetensors`` is written.
            transformer_lora_layers: the LoRA state dict of the transformer.
            transformer_lora_adapter_metadata: ``LoraConfig.to_dict()`` of the adapter, stored so the rank and alpha
                are restored exactly on load.
        """
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` is empty: there are no LoRA weights to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merge the active LoRA adapter(s) into the denoiser weights, scaled by ``lora_scale``."""
        super().fuse_lora(
            components=components or [TRANSFORMER_NAME],
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Undo :meth:`fuse_lora` (the adapters stay loaded)."""
        super().unfuse_lora(components=components or [TRANSFORMER_NAME], **kwargs)
