from .compodiff_transformer import CompoDiffTransformer, CompoDiffTransformerOutput

__all__ = ["CompoDiffTransformer", "CompoDiffTransformerOutput"]
