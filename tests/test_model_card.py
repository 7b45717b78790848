"""Model cards of saved pipelines, and what push_to_hub would upload (no network: huggingface_hub.HfApi is replaced)."""

import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import FIXTURES
from huggingface_hub import ModelCard
from tiny_components import tiny_pipeline

from diffusers_cir import AutoCIRPipeline
from diffusers_cir.utils.model_card import GENERATED_MARKER, ModelCardInfo, ModelResult

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULT = ModelResult(
    dataset="CIRR", split="validation", dataset_id="cirr", metrics={"recall_at1": 0.41, "recall_at5": 0.72},
    protocol="Recall@K over the validation gallery, the reference excluded (official CIRR code).",
    command="diffusers-cir evaluate cirr --pipeline PIPE --data-root CIRR --output-dir eval",
)


def _card(folder):
    return ModelCard.load(Path(folder) / "README.md")


def test_save_pretrained_writes_a_card_with_hub_metadata_and_results(tmp_path):
    pipe = tiny_pipeline()
    info = ModelCardInfo(base_model=["navervision/CompoDiff-Aesthetic", str(tmp_path)], datasets=["me/triplets"],
                         license="apache-2.0", made_with="python train.py --steps 5", results=[RESULT])
    pipe.save_pretrained(tmp_path / "pipe", model_card=info)
    card = _card(tmp_path / "pipe")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers-cir" and data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["me/triplets"]
    assert data["base_model"] == ["navervision/CompoDiff-Aesthetic"]  # the local path is named in the prose only
    assert {"compodiff", "composed-image-retrieval", "diffusers-cir"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("recall_at1", 0.41), ("recall_at5", 0.72)]
    assert "| Recall@1 | Recall@5 |" in card.text and RESULT.command in card.text and RESULT.protocol in card.text
    assert str(tmp_path) in card.text and "python train.py --steps 5" in card.text
    assert "`transformer` | `CompoDiffTransformer`" in card.text
    assert card.text.rstrip().endswith(GENERATED_MARKER)


def test_a_card_the_user_wrote_is_never_overwritten(tmp_path, caplog):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "README.md").write_text("# My notes\n")
    with caplog.at_level(logging.WARNING, logger="diffusers_cir.utils.model_card"):
        tiny_pipeline().save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# My notes\n"
    assert "was not written by diffusers-cir" in caplog.text
    assert (folder / "model_index.json").is_file()


def test_load_and_save_keeps_provenance_and_results_only_while_the_weights_are_the_same(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "a", model_card=ModelCardInfo(license="apache-2.0", results=[RESULT],
                                                                            made_with="make it"))
    loaded = AutoCIRPipeline.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    data = _card(tmp_path / "b").data.to_dict()
    assert data["license"] == "apache-2.0" and data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.41

    with torch.no_grad():  # fine-tuned after loading: the card's numbers are not these weights' numbers
        next(loaded.transformer.parameters()).add_(0.5)
    loaded.save_pretrained(tmp_path / "c")
    card = _card(tmp_path / "c")
    assert card.data.to_dict()["license"] == "apache-2.0"
    assert "model-index" not in card.data.to_dict() and "make it" not in card.text
    assert "The weights changed since they were loaded" in card.text


def test_push_to_hub_uploads_the_saved_folder_with_its_card(tmp_path, monkeypatch):
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            uploads.append(("upload_folder", repo_id, files, (Path(folder_path) / "README.md").read_text(), kwargs))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    commit = tiny_pipeline().push_to_hub("me/tiny-compodiff", model_card={"license": "apache-2.0"}, private=True)
    assert commit == "https://huggingface.co/me/tiny-compodiff/commit/0"
    (_, repo_id, create_kwargs), (_, _, files, readme, upload_kwargs) = uploads
    assert repo_id == "me/tiny-compodiff" and create_kwargs["private"] is True and create_kwargs["repo_type"] == "model"
    assert {"README.md", "model_index.json", "transformer/config.json", "image_encoder/config.json"} <= set(files)
    assert 'AutoCIRPipeline.from_pretrained("me/tiny-compodiff")' in readme and "license: apache-2.0" in readme
    assert upload_kwargs["commit_message"] == "Upload CompoDiffPipeline"


def test_conversions_write_a_card_naming_the_source_and_the_command(tmp_path):
    from diffusers_cir.cli import main

    checkpoint = FIXTURES / "compodiff_tiny" / "original_checkpoint"
    assert main(["convert", "compodiff", "--checkpoint_path", str(checkpoint), "--output_path", str(tmp_path / "p")]) == 0
    card = _card(tmp_path / "p")
    assert card.data.to_dict()["license"] == "apache-2.0"
    assert f"diffusers-cir convert compodiff --checkpoint_path {checkpoint} --output_path {tmp_path / 'p'}" in card.text


def test_model_card_info_refuses_unknown_fields_before_saving_anything(tmp_path):
    with pytest.raises(ValueError, match=r"unknown fields \['licence'\]"):
        tiny_pipeline(with_encoders=False).save_pretrained(tmp_path / "p", model_card={"licence": "mit"})
    assert not (tmp_path / "p").exists()


def test_a_training_run_writes_its_command_and_validation_into_the_card(tmp_path):
    from diffusers_cir.demo import (
        build_world,
        world_training_data_argv,
        write_training_data,
    )
    from diffusers_cir.training import main, parse_args

    data = write_training_data(build_world("tiny"), tmp_path / "data", num_train_triplets=300)
    model = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "num_cross_attention_heads": 2}
    output = tmp_path / "run"
    main(parse_args(world_training_data_argv(data, model) + [
        "--report_to", "none", "--output_dir", str(output), "--max_train_steps", "2", "--train_batch_size", "16",
        "--validation_steps", "2", "--num_validation_queries", "8", "--validation_split", "test",
        "--learning_rate", "3e-4",
    ]))
    card = _card(output)
    assert "accelerate launch examples/train_compodiff.py --" in card.text
    assert "--max-train-steps 2" in card.text and f"--output-dir {output}" in card.text
    assert "--learning-rate 0.0003" in card.text and "--seed" not in card.text  # defaults are left out
    metrics = card.data.to_dict()["model-index"][0]["results"][0]
    assert metrics["dataset"]["split"] == "test" and {m["type"] for m in metrics["metrics"]} >= {"recall_at1"}
    assert "The training script's validation" in card.text
