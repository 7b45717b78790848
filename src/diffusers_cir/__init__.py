"""diffusers-cir: Composed Image Retrieval (CompoDiff, LinCIR) in the Hugging Face ecosystem.

Every component class that can appear in a saved pipeline's ``model_index.json`` is imported here:
diffusers 0.42 only imports ``diffusers``/``transformers`` itself when it loads a pipeline folder.
"""

__version__ = "0.1.0.dev0"

# diffusers resolves a short `["diffusers_cir", "Class"]` entry of model_index.json by looking up the loadable
# base classes on this module, so they must be reachable here too (not part of the public API).
from diffusers import DiffusionPipeline as DiffusionPipeline  # noqa: F401
from diffusers import ModelMixin as ModelMixin  # noqa: F401
from diffusers import SchedulerMixin as SchedulerMixin  # noqa: F401

# CORE-IMPORTS
from .models import TextualInversionProjection, TextualInversionProjectionOutput
from .pipelines import LinCIRPipeline, LinCIRPipelineOutput
from .models import CompoDiffTransformer, CompoDiffTransformerOutput
from .schedulers import CompoDiffScheduler
from .pipelines import CompoDiffPipeline, CompoDiffPipelineOutput

__all__ = [
    "TextualInversionProjection",
    "TextualInversionProjectionOutput",
    "LinCIRPipeline",
    "LinCIRPipelineOutput",
    "CompoDiffTransformer",
    "CompoDiffTransformerOutput",
    "CompoDiffScheduler",
    "CompoDiffPipeline",
    "CompoDiffPipelineOutput",
]
