from .bgevl import BGEVLConversionError, convert_bgevl_checkpoint_to_pipeline
from .compodiff import (
    CompoDiffConversionError,
    convert_compodiff_checkpoint,
    convert_compodiff_checkpoint_to_pipeline,
    convert_compodiff_state_dict,
    load_original_checkpoint,
)
from .lincir import LinCIRConversionError, convert_lincir_phi_checkpoint, convert_phi_state_dict
from .llava_next import convert_llava_next_embedder
from .magiclens import MagicLensConversionError, convert_magiclens_checkpoint_to_pipeline

__all__ = [
    "BGEVLConversionError",
    "convert_bgevl_checkpoint_to_pipeline",
    "LinCIRConversionError",
    "convert_lincir_phi_checkpoint",
    "convert_phi_state_dict",
    "CompoDiffConversionError",
    "convert_compodiff_checkpoint",
    "convert_compodiff_checkpoint_to_pipeline",
    "convert_compodiff_state_dict",
    "load_original_checkpoint",
    "MagicLensConversionError",
    "convert_magiclens_checkpoint_to_pipeline",
    "convert_llava_next_embedder",
]
