"""Every CIR system as a pipeline meeting one contract (see :mod:`diffusers_cir.pipelines.auto`).

Importing this package imports every pipeline module, so each class joins the registry ``PIPELINES``.
"""

from .auto import PIPELINES, AutoCIRPipeline, CIRPipelineMixin
from .pipeline_bgevl import BGEVLPipeline, BGEVLPipelineOutput
from .pipeline_caption_rewrite import CaptionRewritePipeline, CaptionRewritePipelineOutput
from .pipeline_compodiff import CompoDiffPipeline, CompoDiffPipelineOutput
from .pipeline_composition import (
    Clip4CirPipeline,
    CompositionNetworkPipeline,
    CompositionPipelineOutput,
    MTSTPipeline,
    SCOTPipeline,
)
from .pipeline_fashionblip2 import FashionBLIP2Pipeline, FashionBLIP2PipelineOutput
from .pipeline_lincir import LinCIRPipeline, LinCIRPipelineOutput
from .pipeline_magiclens import MagicLensPipeline, MagicLensPipelineOutput
from .pipeline_mllm_embedding import MLLMEmbeddingPipeline, MLLMEmbeddingPipelineOutput

__all__ = [
    "PIPELINES",
    "AutoCIRPipeline",
    "BGEVLPipeline",
    "BGEVLPipelineOutput",
    "CIRPipelineMixin",
    "CaptionRewritePipeline",
    "CaptionRewritePipelineOutput",
    "Clip4CirPipeline",
    "CompoDiffPipeline",
    "CompoDiffPipelineOutput",
    "CompositionNetworkPipeline",
    "CompositionPipelineOutput",
    "FashionBLIP2Pipeline",
    "FashionBLIP2PipelineOutput",
    "LinCIRPipeline",
    "LinCIRPipelineOutput",
    "MagicLensPipeline",
    "MagicLensPipelineOutput",
    "MLLMEmbeddingPipeline",
    "MLLMEmbeddingPipelineOutput",
    "MTSTPipeline",
    "SCOTPipeline",
]
