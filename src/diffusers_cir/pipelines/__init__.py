from .pipeline_compodiff import CompoDiffPipeline, CompoDiffPipelineOutput
from .pipeline_lincir import LinCIRPipeline, LinCIRPipelineOutput

__all__ = ["CompoDiffPipeline", "CompoDiffPipelineOutput", "LinCIRPipeline", "LinCIRPipelineOutput"]
