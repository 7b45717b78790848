"""`examples/train_lincir.py` as a user drives it: output folders, resuming, argument checks (tiny CLIP, seconds)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_cir import LinCIRPipeline
from diffusers_cir.utils import build_offline_clip_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_lincir.py"
CAPTIONS = [f"a {color} {thing} on a {place}" for color in ("red", "blue", "green", "white") for thing in ("car", "dog", "cup")
            for place in ("road", "table")]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_lincir_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lincir_script")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                            max_position_embeddings=77, projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModelWithProjection(config).save_pretrained(root / "clip" / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(root / "clip" / "tokenizer")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return root


def _args(root, output_dir, *extra, clip=None):
    return ["--pretrained_model_name_or_path", str(clip or root / "clip"), "--train_data", str(root / "captions.txt"),
            "--output_dir", str(output_dir), "--batch_size", "4", "--keyword_extractor", "builtin", "--seed", "0",
            "--shuffle_buffer_size", "0", *extra]


def test_new_run_into_a_folder_with_checkpoints_is_refused_before_loading_anything(script, tiny_world, tmp_path):
    (tmp_path / "checkpoint-100").mkdir()
    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    with pytest.raises(ValueError, match=r"already holds checkpoints .*checkpoint-100.*--resume_from_checkpoint latest"):
        script.main(_args(tiny_world, tmp_path, "--max_train_steps", "1", clip=missing_model))
    with pytest.raises(ValueError, match="--resume_from_checkpoint 'checkpoint-7' is not a checkpoint-<step> folder"):
        script.main(_args(tiny_world, tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "checkpoint-7",
                          clip=missing_model))


def test_latest_without_checkpoints_starts_and_a_partial_checkpoint_is_never_resumed(script, tiny_world, tmp_path):
    out = tmp_path / "out"
    first = script.main(_args(tiny_world, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                              "--resume_from_checkpoint", "latest"))
    assert first["global_step"] == 2 and first["resumed_from_step"] is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (out / "checkpoint-3.partial").mkdir()  # what a run killed while saving leaves behind
    resumed = script.main(_args(tiny_world, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from_step"] == 2 and resumed["global_step"] == 3
    assert LinCIRPipeline.from_pretrained(out).phi.config.input_dim == 16
