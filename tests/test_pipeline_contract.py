"""Every registered CIR pipeline meets the contract (tests in `pipeline_tester.CIRPipelineTesterMixin`)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import CIRPipelineTesterMixin  # noqa: E402
from tiny_components import tiny_pipeline  # noqa: E402

from diffusers_cir import (  # noqa: E402
    BGEVLPipeline,
    CaptionRewritePipeline,
    Clip4CirPipeline,
    CompoDiffPipeline,
    FashionBLIP2Pipeline,
    LinCIRPipeline,
    MagicLensPipeline,
    MLLMEmbeddingPipeline,
    MTSTPipeline,
    SCOTPipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class TestCompoDiffPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = CompoDiffPipeline

    def get_pipeline(self):
        return tiny_pipeline()

    def query_kwargs(self):
        return {"generator": torch.Generator().manual_seed(0), "num_inference_steps": 4}


class TestLinCIRPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = LinCIRPipeline

    def get_pipeline(self):
        from test_lincir_pipeline import tiny_pipeline as tiny_lincir

        pipe = tiny_lincir(with_vision=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class TestBGEVLPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = BGEVLPipeline

    def get_pipeline(self):
        from test_pipeline_bgevl import tiny_bgevl_pipeline

        return tiny_bgevl_pipeline()


class TestMagicLensPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = MagicLensPipeline

    def get_pipeline(self):
        from test_magiclens_pipeline import tiny_magiclens_pipeline

        return tiny_magiclens_pipeline()


class TestMLLMEmbeddingPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = MLLMEmbeddingPipeline

    def get_pipeline(self):
        from tiny_mllm import tiny_mllm_pipeline

        return tiny_mllm_pipeline()


class TestCaptionRewritePipelineContract(CIRPipelineTesterMixin):
    pipeline_class = CaptionRewritePipeline

    def get_pipeline(self):
        from tiny_mllm import tiny_caption_rewrite_pipeline

        return tiny_caption_rewrite_pipeline(cache_dir=None)


class TestClip4CirPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = Clip4CirPipeline

    def get_pipeline(self):
        from tiny_fusion import tiny_composition_pipeline

        return tiny_composition_pipeline(Clip4CirPipeline)


class TestClip4CirTargetPadContract(TestClip4CirPipelineContract):
    """CLIP4Cir with its authors' target-pad preprocessing (a TargetPadImageProcessor) meets the contract too."""

    def get_pipeline(self):
        from diffusers_cir.retrieval.image_processing_targetpad import image_processor_for

        pipe = super().get_pipeline()
        pipe.image_processor = image_processor_for(pipe.image_processor, "targetpad")
        return pipe


class TestSCOTPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = SCOTPipeline

    def get_pipeline(self):
        from tiny_fusion import tiny_composition_pipeline

        return tiny_composition_pipeline(SCOTPipeline)


class TestMTSTPipelineContract(CIRPipelineTesterMixin):
    pipeline_class = MTSTPipeline

    def get_pipeline(self):
        from tiny_fusion import tiny_composition_pipeline

        return tiny_composition_pipeline(MTSTPipeline, head="two_hop")


class TestFashionBLIP2PipelineContract(CIRPipelineTesterMixin):
    pipeline_class = FashionBLIP2Pipeline

    def get_pipeline(self):
        from tiny_fusion import tiny_fashionblip2_pipeline

        return tiny_fashionblip2_pipeline()


def test_every_registered_pipeline_has_a_contract_test():
    from diffusers_cir.pipelines import PIPELINES

    tested = {cls.pipeline_class.__name__ for cls in _all_subclasses(CIRPipelineTesterMixin) if cls.pipeline_class}
    assert set(PIPELINES) <= tested, f"no contract test for {sorted(set(PIPELINES) - tested)}"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)
