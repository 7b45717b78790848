from .compodiff_transformer import CompoDiffTransformer, CompoDiffTransformerOutput
from .textual_inversion_projection import TextualInversionProjection, TextualInversionProjectionOutput

__all__ = [
    "CompoDiffTransformer",
    "CompoDiffTransformerOutput",
    "TextualInversionProjection",
    "TextualInversionProjectionOutput",
]
