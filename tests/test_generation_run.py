"""Generation runs end to end on tiny components built in code: the offline demo through the command line into a valid
dataset (counts, card, contact sheet), a run killed with SIGKILL that resumes to identical shards, two
accelerate processes that write the same dataset as one, the lock against a second writer, and the CompoDiff trainer
reading a generated dataset."""

import hashlib
import json
import os
import runpy
import signal
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from diffusers_cir.generation import tiny
from diffusers_cir.generation.config import (
    FilterConfig,
    GenerationConfig,
    ImagePairConfig,
    KeywordConfig,
    PairTextConfig,
)

REPO = Path(__file__).resolve().parents[1]


def _digests(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder, "images").glob("*.parquet"))}


def test_demo_writes_a_valid_dataset_with_counts_card_and_contact_sheet(tmp_path, capsys):
    """`diffusers-cir generate --demo`: every stage, offline, into a dataset that validates and streams; the printed
    counts are the card's; the contact sheet shows every row. (Resuming is the kill test's.)"""
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from diffusers_cir import cli
    from diffusers_cir.data.card import read_card_infos
    from diffusers_cir.data.shards import validate_dataset
    from diffusers_cir.generation.templates import KEYWORD_TEMPLATES, fill_template

    output = tmp_path / "triplets"
    assert cli.main(["generate", "--demo", "--output", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for line in ("filter image_caption", "filter directional", "filter keyword_image", "filter instruction_image",
                 "filter nsfw", "masks", "throughput:", "triplets per hour per CPU process", "contact sheet:"):
        assert line in printed, line
    report = validate_dataset(str(output), progress=False)
    assert report.ok, report.format()
    rows = list(load_dataset(str(output), "images", split="train", streaming=True))
    card_rows = read_card_infos(str(output))["images"].splits["train"].num_examples
    assert len(rows) == report.counts["images/train"] == card_rows
    assert {row["method"] for row in rows} == {"keyword", "llm", "mtst", "facap"}
    for row in rows:
        if row["method"] == "keyword":  # the instruction is the recorded template filled with the recorded keywords
            template = KEYWORD_TEMPLATES[row["template_index"]]
            assert row["modification_text"] == fill_template(template, row["source_keyword"], row["target_keyword"])
            assert row["mask"].size == (64, 64) and row["mask_term"] == row["target_keyword"]
        if row["method"] == "mtst":
            assert row["reverse_modification_text"] and row["mask"] is None

    recorded = json.loads((output / "generation" / "train" / "config.json").read_text())
    assert recorded["config"]["filters"]["image_image"] == 0.7
    counts = DatasetCard.load(str(output / "README.md")).data.to_dict()["generation"]["train"]["counts"]
    assert sum(stages["rows"] for stages in counts.values()) == len(rows)
    keyword = counts["keyword"]
    assert keyword["caption_triplets"]["kept"] * 2 == keyword["image_pairs"]  # two seeds per triplet
    assert keyword["filters"]["image_caption"]["in"] == keyword["image_pairs"]
    assert f"kept {keyword['filters']['nsfw']['kept']:>8,} of {keyword['filters']['nsfw']['in']:>8,}" in printed

    class Sheet(HTMLParser):
        images, rows = 0, 0

        def handle_starttag(self, tag, attrs):
            self.images += tag == "img" and dict(attrs)["src"].startswith("data:image/png;base64,")
            self.rows += tag == "tr"

    sheet = Sheet()
    sheet.feed((output / "generation" / "train" / "contact_sheet.html").read_text())
    assert sheet.rows - 1 == len(rows)  # a header row, then every triplet
    assert sheet.images >= 2 * len(rows)  # reference and target at least

    assert "this run wrote 6 shard(s), skipped 0 done before" in printed


# --------------------------------------------------------------------------------------------- kill, resume, ranks
def _small_config(folder: Path) -> GenerationConfig:
    """Keyword triplets over 6 captions and MTST texts over 4 pairs: 5 shards of 2 items, one item per chunk."""
    from diffusers_cir.generation.demo import write_demo_inputs

    inputs = write_demo_inputs(str(folder))
    return GenerationConfig(
        strategies=("keyword", "mtst"), captions=inputs["captions"], image_pairs=inputs["image_pairs"],
        max_items=6, items_per_shard=2, chunk_size=1, image_format="png",
        image=ImagePairConfig(num_seeds=2, num_inference_steps=2, batch_size=2),
        filters=FilterConfig(image_caption=None, image_image=None, directional=None, keyword_image=None),
        pairs=PairTextConfig(max_new_tokens=4),
        keyword=KeywordConfig(similarity_band=(-1.0, 1.0), tagger="builtin"),
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small recipe, its tiny components, and one uninterrupted single-process run of it."""
    from diffusers_cir.generation.runner import run_generation

    folder = tmp_path_factory.mktemp("small")
    config = _small_config(folder / "inputs")
    components = tiny.tiny_components(("keyword", "mtst"))
    straight = run_generation(config, components, str(folder / "straight"), progress=False)
    assert straight.shards_total == 5 and straight.rows > 0
    return folder, config, components, straight


@pytest.mark.slow
def test_a_killed_run_resumes_to_identical_shards_and_a_second_writer_is_refused(small):
    from filelock import FileLock

    from diffusers_cir.generation.output import record_path
    from diffusers_cir.generation.runner import LOCK_NAME, run_generation

    folder, config, components, straight = small

    killed = folder / "killed"

    def die_inside_shard_1(event, info):
        if event == "chunk_written" and info["shard"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, as a preempted node

    pid = os.fork()
    if pid == 0:  # the child generates until it kills itself
        try:
            run_generation(config, components, str(killed), progress=False, callback=die_inside_shard_1)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    names = sorted(p.name for p in (killed / "images").iterdir())
    assert names == [".train-00001-of-00005.parquet.partial", "train-00000-of-00005.parquet"], names
    assert not os.path.exists(record_path(str(killed), "train", 1))

    with FileLock(str(killed / LOCK_NAME)):  # a second writer while one holds the folder
        with pytest.raises(FileExistsError, match="Another process is writing to .*another --output"):
            run_generation(config, components, str(killed), progress=False)

    resumed = run_generation(config, components, str(killed), progress=False)
    assert resumed.shards_written == 4 and resumed.rows == straight.rows
    assert _digests(killed) == _digests(folder / "straight")
    assert not any(p.name.endswith(".partial") for p in (killed / "images").iterdir())

    changed = GenerationConfig.from_dict({**config.to_dict(), "seed": 1})
    with pytest.raises(ValueError, match=r"another recipe \(differs in: config.seed \(0 before, 1 now\)"):
        run_generation(changed, components, str(killed), progress=False)


def _two_process_worker(config_dict, output):
    from accelerate.state import PartialState

    from diffusers_cir.generation.config import GenerationConfig
    from diffusers_cir.generation.runner import run_generation

    PartialState._reset_state()  # forked from the test process, which set up a one-process state before

    components = tiny.tiny_components(("keyword", "mtst"))
    result = run_generation(GenerationConfig.from_dict(config_dict), components, output, progress=False)
    assert result.num_processes == 2 and result.shards_written == 5


def test_two_accelerate_processes_write_the_dataset_one_process_writes(small):
    from accelerate import debug_launcher

    from diffusers_cir.generation.output import read_json, record_path

    folder, config, _, _ = small
    output = folder / "two_processes"
    debug_launcher(_two_process_worker, args=(config.to_dict(), str(output)), num_processes=2)
    assert _digests(output) == _digests(folder / "straight")
    shards = [read_json(record_path(str(output), "train", i)) for i in range(5)]
    assert [(s["strategy"], s["items"]) for s in shards] == [
        ("keyword", [0, 2]), ("keyword", [2, 4]), ("keyword", [4, 6]), ("mtst", [0, 2]), ("mtst", [2, 4])]


# --------------------------------------------------------------------------------------------- the trainer reads it
def test_the_compodiff_training_script_trains_on_a_generated_dataset(small, tmp_path):
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from diffusers_cir.utils import build_offline_clip_tokenizer

    output = small[0] / "straight"
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77, eos_token_id=49407, pad_token_id=49407)
                  ).save_pretrained(tmp_path / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "image_encoder")
    argv = [
        "train_compodiff.py", "--train_data_dir", str(output), "--dataset_config_name", "images",
        "--transformer_config", json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                            "num_cross_attention_heads": 2}),
        "--text_encoder_name_or_path", str(tmp_path / "text_encoder"),
        "--tokenizer_name_or_path", str(tmp_path / "tokenizer"),
        "--image_encoder_name_or_path", str(tmp_path / "image_encoder"),
        "--objective_ratios", "triplet=0.5,text_to_image=0,masked=0.5", "--train_batch_size", "4",
        "--max_train_steps", "2", "--checkpointing_steps", "100", "--shuffle_buffer_size", "0", "--report_to", "none",
        "--output_dir", str(tmp_path / "model"),
    ]
    saved_argv = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "examples" / "train_compodiff.py"), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exit_info.value.code in (0, None)
    assert (tmp_path / "model" / "transformer" / "config.json").is_file()
