from .pipeline_compodiff import CompoDiffPipeline, CompoDiffPipelineOutput

__all__ = ["CompoDiffPipeline", "CompoDiffPipelineOutput"]
