"""LoRA for CompoDiff: the pipeline's loader (save, load, fuse, unfuse, unload) and a LoRA fine-tune with the training
script that changes the prior's outputs, saves a small file and reloads to the same outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer
from diffusers_cir.training.compodiff_arguments import DEFAULT_LORA_TARGETS

REPO = Path(__file__).resolve().parents[1]


def tiny_pipeline() -> CompoDiffPipeline:
    torch.manual_seed(0)
    transformer = CompoDiffTransformer(
        embedding_dim=32, text_embedding_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=16
    )
    pipe = CompoDiffPipeline(transformer, CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


INPUTS = dict(image_embeds=torch.randn(3, 32, generator=torch.Generator().manual_seed(1)),
              prompt_embeds=torch.randn(3, 77, 16, generator=torch.Generator().manual_seed(2)),
              negative_prompt_embeds=torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(3)))


def compose(pipe) -> torch.Tensor:
    return pipe(**INPUTS, generator=torch.Generator().manual_seed(0)).image_embeds


def adapted(pipe) -> LoraConfig:
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=DEFAULT_LORA_TARGETS)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    return config


def test_default_targets_are_the_attention_and_feed_forward_projections():
    pipe = tiny_pipeline()
    adapted(pipe)
    wrapped = sorted({name.rsplit(".lora_A", 1)[0] for name, _ in pipe.transformer.named_modules() if ".lora_A" in name})
    expected = sorted(f"blocks.{layer}.{part}" for layer in range(2) for part in (
        "self_attn.to_q", "self_attn.to_kv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv",
        "cross_attn.to_out", "ff.proj_in", "ff.proj_out"))
    assert wrapped == expected  # the top-level proj_out, text_proj and condition MLPs stay frozen


def test_pipeline_lora_save_load_fuse_unfuse_unload(tmp_path):
    base_pipe = tiny_pipeline()
    base = compose(base_pipe)
    config = adapted(base_pipe)
    with_lora = compose(base_pipe)
    assert (with_lora - base).abs().max() > 1e-2

    CompoDiffPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(base_pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("transformer.") and "lora" in key for key in saved)

    pipe = tiny_pipeline()
    torch.testing.assert_close(compose(pipe), base, rtol=0, atol=0)
    pipe.load_lora_weights(tmp_path, adapter_name="edit")
    torch.testing.assert_close(compose(pipe), with_lora, rtol=0, atol=0)
    assert pipe.transformer.peft_config["edit"].r == 4 and pipe.transformer.peft_config["edit"].lora_alpha == 8

    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    torch.testing.assert_close(compose(pipe), with_lora, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(compose(pipe), with_lora, rtol=1e-4, atol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(compose(pipe), base, rtol=1e-4, atol=1e-4)
    assert not getattr(pipe.transformer, "peft_config", None)


def test_model_level_lora_files_load_too(tmp_path):
    """``CompoDiffTransformer.save_lora_adapter`` writes keys without the ``transformer.`` prefix; diffusers' default
    prefix would silently load nothing from them."""
    source = tiny_pipeline()
    adapted(source)
    expected = compose(source)
    source.transformer.save_lora_adapter(str(tmp_path))
    assert not any(k.startswith("transformer.") for k in load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(compose(pipe), expected, rtol=0, atol=0)


def test_lora_files_that_do_not_fit_are_rejected(tmp_path):
    pipe = tiny_pipeline()
    save_file({"transformer.blocks.0.ff.proj_in.weight": torch.zeros(2, 2)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(ValueError, match="not LoRA weights"):
        pipe.load_lora_weights(str(tmp_path / "not_lora.safetensors"))
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2), "unet.y.lora_A.weight": torch.zeros(2, 2)},
              str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="mixes"):
        pipe.load_lora_weights(str(tmp_path / "mixed.safetensors"))
    with pytest.raises(Exception, match="not found in the base model|match no layer"):
        pipe.load_lora_weights({"nowhere.lora_A.weight": torch.zeros(4, 32), "nowhere.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(ValueError, match="empty"):
        CompoDiffPipeline.save_lora_weights(tmp_path, transformer_lora_layers={})


@pytest.mark.slow
def test_lora_fine_tune_with_the_training_script(tmp_path):
    """Fine-tune a trained prior with --use_lora: the adapter changes the outputs, is a small file, reloads to the same
    outputs, and can be fused and unloaded."""
    from diffusers_cir.demo import TEXT_TO_IMAGE_MAPPING, build_world, write_training_data

    world = build_world("tiny")
    data = write_training_data(world, tmp_path / "data", num_train_triplets=2000)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    common = ["--train_data_dir", data, "--report_to", "none", "--train_batch_size", "32", "--shuffle_buffer_size", "0",
              "--checkpointing_steps", "1000", "--lr_warmup_steps", "0"]

    def train(argv):
        result = subprocess.run([sys.executable, str(REPO / "examples" / "train_compodiff.py")] + common + argv,
                                capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr[-5000:]

    prior = tmp_path / "prior"
    train(["--transformer_config", json.dumps({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                                               "num_cross_attention_heads": 2}),
           "--text_encoder_name_or_path", os.path.join(data, "text_encoder"),
           "--tokenizer_name_or_path", os.path.join(data, "tokenizer"),
           "--text_to_image_data_dir", data, "--text_to_image_config_name", "gallery", "--text_to_image_split", "test",
           "--text_to_image_column_mapping", json.dumps(TEXT_TO_IMAGE_MAPPING),
           "--max_train_steps", "10", "--learning_rate", "1e-3", "--output_dir", str(prior)])
    lora = tmp_path / "lora"
    train(["--pretrained_model_name_or_path", str(prior), "--use_lora", "--lora_rank", "4", "--lora_alpha", "4",
           "--objective_ratios", "triplet=1", "--max_train_steps", "10", "--learning_rate", "1e-2",
           "--output_dir", str(lora)])

    lora_file = lora / "pytorch_lora_weights.safetensors"
    full_file = prior / "transformer" / "diffusion_pytorch_model.safetensors"
    assert lora_file.is_file() and not (lora / "model_index.json").exists()
    assert lora_file.stat().st_size < 0.2 * full_file.stat().st_size

    test = world.triplets("test")
    references = world.image_embeds[torch.from_numpy(test.reference_indices[:16])]
    prompts = test.modification_texts[:16]

    def queries(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(image_embeds=references, prompt=prompts, generator=torch.Generator().manual_seed(0)).image_embeds

    base = queries(CompoDiffPipeline.from_pretrained(str(prior)))
    first = CompoDiffPipeline.from_pretrained(str(prior))
    first.load_lora_weights(str(lora))
    tuned = queries(first)
    assert (tuned - base).abs().max() > 1e-3  # the fine-tune changed the prior
    second = CompoDiffPipeline.from_pretrained(str(prior))
    second.load_lora_weights(str(lora))
    torch.testing.assert_close(queries(second), tuned, rtol=0, atol=0)
    second.fuse_lora()
    torch.testing.assert_close(queries(second), tuned, rtol=1e-4, atol=1e-4)
    second.unfuse_lora()
    second.unload_lora_weights()
    torch.testing.assert_close(queries(second), base, rtol=1e-4, atol=1e-4)
