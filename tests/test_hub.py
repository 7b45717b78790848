"""Uploads of datasets and metric Spaces (``diffusers_cir.utils.hub``, ``diffusers-cir push``): the folder that would be
uploaded is checked and inspected; huggingface_hub.HfApi is replaced, so nothing touches the network."""

from pathlib import Path

import huggingface_hub
import pytest

from diffusers_cir.cli import main
from diffusers_cir.utils.hub import push_dataset_to_hub, push_metric_to_hub

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            calls.append({"call": "create_repo", "repo_id": repo_id, "token": self.token, **kwargs})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            calls.append({"call": "upload_folder", "repo_id": repo_id, "files": files, **kwargs})
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    folder = tmp_path_factory.mktemp("data") / "triplets"
    SyntheticCIRWorld(SyntheticWorldConfig.tiny()).write_embeddings_dataset(
        str(folder), num_triplets={"train": 20, "test": None}, progress=False)
    return folder


def test_a_dataset_folder_is_uploaded_whole_as_a_dataset_repo(hub, dataset_folder):
    assert push_dataset_to_hub(dataset_folder, "me/tiny-triplets", private=True, token="t") == (
        "https://huggingface.co/me/tiny-triplets/commit/1")
    create, upload = hub
    assert create["repo_type"] == "dataset" and create["private"] is True and create["token"] == "t"
    assert upload["repo_type"] == "dataset" and "README.md" in upload["files"]
    assert any(name.startswith("embeddings/train-") for name in upload["files"])
    assert any(name.startswith("gallery/test-") for name in upload["files"])


def test_a_dataset_whose_card_names_missing_files_is_refused_before_any_upload(hub, dataset_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset_folder, broken)
    for shard in (broken / "gallery").iterdir():
        shard.unlink()
    with pytest.raises(ValueError, match=r"configuration 'gallery', split 'test', and no file matches"):
        push_dataset_to_hub(broken, "me/broken")
    (broken / "README.md").unlink()
    with pytest.raises(ValueError, match="has no README.md"):
        push_dataset_to_hub(broken, "me/broken")
    assert hub == []


def test_a_metric_folder_is_uploaded_as_a_gradio_space(hub):
    push_metric_to_hub(REPO_ROOT / "hub" / "metrics" / "cirr", "me/cirr")
    create, upload = hub
    assert create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert {"README.md", "app.py", "cirr.py", "requirements.txt"} <= set(upload["files"])


def test_a_folder_that_is_not_a_metric_space_is_refused(hub, tmp_path):
    (tmp_path / "cirr").mkdir()
    (tmp_path / "cirr" / "app.py").write_text("")
    with pytest.raises(ValueError, match=r"README.md, requirements.txt, cirr.py missing"):
        push_metric_to_hub(tmp_path / "cirr", "me/cirr")
    assert hub == []


def test_cli_push_checks_then_uploads(hub, dataset_folder, tmp_path, capsys):
    assert main(["push", "metric", str(REPO_ROOT / "hub" / "metrics" / "circo"), "me/circo", "--private"]) == 0
    assert "Uploaded" in capsys.readouterr().out and hub[0]["private"] is True
    assert main(["push", "pipeline", str(tmp_path), "me/nothing"]) == 2
    assert "model_index.json" in capsys.readouterr().err
