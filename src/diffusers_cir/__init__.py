"""diffusers-cir: Composed Image Retrieval (CompoDiff, LinCIR) in the Hugging Face ecosystem.

Every component class that can appear in a saved pipeline's ``model_index.json`` is imported here:
diffusers 0.42 only imports ``diffusers``/``transformers`` itself when it loads a pipeline folder.
"""

__version__ = "0.1.0.dev0"

# CORE-IMPORTS
from .models import CompoDiffTransformer, CompoDiffTransformerOutput
from .schedulers import CompoDiffScheduler
from .pipelines import CompoDiffPipeline, CompoDiffPipelineOutput

__all__ = [
    "CompoDiffTransformer",
    "CompoDiffTransformerOutput",
    "CompoDiffScheduler",
    "CompoDiffPipeline",
    "CompoDiffPipelineOutput",
]
