from .clip4cir_combiner import Clip4CirCombiner, FusionHeadOutput
from .compodiff_transformer import CompoDiffTransformer, CompoDiffTransformerOutput
from .magiclens_fusion import MagicLensFusion, MagicLensFusionOutput
from .multi_head_matching import MultiHeadMatchingHead, MultiHeadMatchingOutput
from .open_clip_text import OpenCLIPTextEncoder, OpenCLIPTextEncoderOutput
from .open_clip_vision import OpenCLIPVisionEncoder, OpenCLIPVisionEncoderOutput
from .textual_inversion_projection import TextualInversionProjection, TextualInversionProjectionOutput
from .two_hop_fusion import TwoHopFusionHead

__all__ = [
    "Clip4CirCombiner",
    "CompoDiffTransformer",
    "CompoDiffTransformerOutput",
    "FusionHeadOutput",
    "MagicLensFusion",
    "MagicLensFusionOutput",
    "MultiHeadMatchingHead",
    "MultiHeadMatchingOutput",
    "OpenCLIPTextEncoder",
    "OpenCLIPTextEncoderOutput",
    "OpenCLIPVisionEncoder",
    "OpenCLIPVisionEncoderOutput",
    "TextualInversionProjection",
    "TextualInversionProjectionOutput",
    "TwoHopFusionHead",
]
