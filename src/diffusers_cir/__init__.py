"""diffusers-cir: Composed Image Retrieval in the Hugging Face ecosystem.

Names are imported on first use (``import diffusers_cir`` loads neither torch nor diffusers), so the command line
starts fast. Loading a saved pipeline imports its class's module, and with it every component class its
``model_index.json`` can name: diffusers 0.42 resolves a component's library from ``sys.modules`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

__version__ = "0.1.0.dev0"

# public name -> module that defines it (relative to this package)
_LAZY_NAMES = {
    "AutoCIRPipeline": ".pipelines.auto",
    "BGEVLPipeline": ".pipelines.pipeline_bgevl",
    "BGEVLPipelineOutput": ".pipelines.pipeline_bgevl",
    "CIRPipelineMixin": ".pipelines.auto",
    "CaptionRewritePipeline": ".pipelines.pipeline_caption_rewrite",
    "CaptionRewritePipelineOutput": ".pipelines.pipeline_caption_rewrite",
    "Clip4CirCombiner": ".models.clip4cir_combiner",
    "Clip4CirPipeline": ".pipelines.pipeline_composition",
    "CompositionNetworkPipeline": ".pipelines.pipeline_composition",
    "CompositionPipelineOutput": ".pipelines.pipeline_composition",
    "CompoDiffPipeline": ".pipelines.pipeline_compodiff",
    "CompoDiffPipelineOutput": ".pipelines.pipeline_compodiff",
    "CompoDiffScheduler": ".schedulers.scheduling_compodiff",
    "CompoDiffTransformer": ".models.compodiff_transformer",
    "CompoDiffTransformerOutput": ".models.compodiff_transformer",
    "FashionBLIP2Pipeline": ".pipelines.pipeline_fashionblip2",
    "FashionBLIP2PipelineOutput": ".pipelines.pipeline_fashionblip2",
    "LinCIRPipeline": ".pipelines.pipeline_lincir",
    "LinCIRPipelineOutput": ".pipelines.pipeline_lincir",
    "MagicLensFusion": ".models.magiclens_fusion",
    "MagicLensFusionOutput": ".models.magiclens_fusion",
    "MagicLensImageProcessor": ".pipelines.image_processing_magiclens",
    "MagicLensPipeline": ".pipelines.pipeline_magiclens",
    "MagicLensPipelineOutput": ".pipelines.pipeline_magiclens",
    "MLLMEmbeddingPipeline": ".pipelines.pipeline_mllm_embedding",
    "MLLMEmbeddingPipelineOutput": ".pipelines.pipeline_mllm_embedding",
    "MTSTPipeline": ".pipelines.pipeline_composition",
    "MultiHeadMatchingHead": ".models.multi_head_matching",
    "OpenCLIPTextEncoder": ".models.open_clip_text",
    "OpenCLIPVisionEncoder": ".models.open_clip_vision",
    "SCOTPipeline": ".pipelines.pipeline_composition",
    "TargetPadImageProcessor": ".retrieval.image_processing_targetpad",
    "TextualInversionProjection": ".models.textual_inversion_projection",
    "TextualInversionProjectionOutput": ".models.textual_inversion_projection",
    "TwoHopFusionHead": ".models.two_hop_fusion",
    "Int8DynamicLinear": ".models.cpu_int8",
    "composed_search": ".retrieval.search",
    "load_image": ".retrieval.images",
    "quantize_for_cpu": ".models.cpu_int8",
    # diffusers resolves a short `["diffusers_cir", "Class"]` entry of model_index.json by looking up the loadable
    # base classes on this module, so they must be reachable here too (not part of the public API).
    "DiffusionPipeline": "diffusers",
    "ModelMixin": "diffusers",
    "SchedulerMixin": "diffusers",
}

__all__ = sorted(name for name in _LAZY_NAMES if name not in ("DiffusionPipeline", "ModelMixin", "SchedulerMixin"))


__getattr__, __dir__ = lazy_names(__name__, _LAZY_NAMES, globals())



if TYPE_CHECKING:  # pragma: no cover
    from .models.clip4cir_combiner import Clip4CirCombiner
    from .models.compodiff_transformer import CompoDiffTransformer, CompoDiffTransformerOutput
    from .models.cpu_int8 import Int8DynamicLinear, quantize_for_cpu
    from .models.magiclens_fusion import MagicLensFusion, MagicLensFusionOutput
    from .models.multi_head_matching import MultiHeadMatchingHead
    from .models.open_clip_text import OpenCLIPTextEncoder
    from .models.open_clip_vision import OpenCLIPVisionEncoder
    from .models.textual_inversion_projection import TextualInversionProjection, TextualInversionProjectionOutput
    from .models.two_hop_fusion import TwoHopFusionHead
    from .pipelines.auto import AutoCIRPipeline, CIRPipelineMixin
    from .pipelines.image_processing_magiclens import MagicLensImageProcessor
    from .pipelines.pipeline_bgevl import BGEVLPipeline, BGEVLPipelineOutput
    from .pipelines.pipeline_caption_rewrite import CaptionRewritePipeline, CaptionRewritePipelineOutput
    from .pipelines.pipeline_compodiff import CompoDiffPipeline, CompoDiffPipelineOutput
    from .pipelines.pipeline_composition import (
        Clip4CirPipeline,
        CompositionNetworkPipeline,
        CompositionPipelineOutput,
        MTSTPipeline,
        SCOTPipeline,
    )
    from .pipelines.pipeline_fashionblip2 import FashionBLIP2Pipeline, FashionBLIP2PipelineOutput
    from .pipelines.pipeline_lincir import LinCIRPipeline, LinCIRPipelineOutput
    from .pipelines.pipeline_magiclens import MagicLensPipeline, MagicLensPipelineOutput
    from .pipelines.pipeline_mllm_embedding import MLLMEmbeddingPipeline, MLLMEmbeddingPipelineOutput
    from .retrieval.image_processing_targetpad import TargetPadImageProcessor
    from .retrieval.images import load_image
    from .retrieval.search import composed_search
    from .schedulers.scheduling_compodiff import CompoDiffScheduler
