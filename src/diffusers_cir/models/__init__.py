from .compodiff_transformer import CompoDiffTransformer, CompoDiffTransformerOutput
from .magiclens_fusion import MagicLensFusion, MagicLensFusionOutput
from .textual_inversion_projection import TextualInversionProjection, TextualInversionProjectionOutput

__all__ = [
    "CompoDiffTransformer",
    "CompoDiffTransformerOutput",
    "MagicLensFusion",
    "MagicLensFusionOutput",
    "TextualInversionProjection",
    "TextualInversionProjectionOutput",
]
