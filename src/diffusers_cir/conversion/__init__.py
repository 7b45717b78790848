from .compodiff import (
    CompoDiffConversionError,
    convert_compodiff_checkpoint,
    convert_compodiff_checkpoint_to_pipeline,
    convert_compodiff_state_dict,
    load_original_checkpoint,
)

__all__ = [
    "CompoDiffConversionError",
    "convert_compodiff_checkpoint",
    "convert_compodiff_checkpoint_to_pipeline",
    "convert_compodiff_state_dict",
    "load_original_checkpoint",
]
