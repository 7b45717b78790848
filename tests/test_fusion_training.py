"""The composition-network trainer (examples/train_fusion.py): every method learns to compose held-out combinations of
the synthetic world, a stopped run resumes bit for bit, LoRA adapters are merged into the saved towers, two processes
train and save once, and argument mistakes are one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_cir import AutoCIRPipeline
from diffusers_cir.training.fusion_arguments import parse_args
from diffusers_cir.training.state import load_state_files
from diffusers_cir.training.train_fusion import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_fusion.py"
SCOT_ON_SYNTHTRIPLETS = ('{"image_embeds": "reference_image_embeds", "caption": "reference_caption", '
                         '"modified_caption": "target_caption"}')


@pytest.fixture(scope="module")
def tiny_world():
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    return SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=0))


@pytest.fixture(scope="module")
def tiny_data(tiny_world, tmp_path_factory):
    """The world in the SynthTriplets embeddings layout (with reverse texts), its text tower and tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_world")
    tiny_world.write_embeddings_dataset(str(folder), num_triplets={"train": 8000, "validation": None, "test": None},
                                        rows_per_shard=2000, progress=False)
    tiny_world.text_encoder.save_pretrained(folder / "text_encoder")
    tiny_world.tokenizer.save_pretrained(folder / "tokenizer")
    return str(folder)


def method_args(method: str, data: str, output) -> list[str]:
    argv = ["--method", method, "--pretrained-model-name-or-path", data, "--train-data-dir", data,
            "--dataset-config-name", "embeddings", "--report-to", "none", "--output-dir", str(output)]
    if method == "scot":
        argv += ["--column-mapping", SCOT_ON_SYNTHTRIPLETS]
    return argv


# --------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip4cir", "scot", "mtst"])
def test_each_method_learns_to_compose_held_out_combinations(method, tiny_world, tiny_data, tmp_path, single_thread):
    """100 steps (seconds) on the 96-item world: on held-out (object, color) compositions the saved pipeline, run
    through the retrieval code (compose_queries, then Recall@K of diffusers_cir.metrics), beats the best training-free
    baseline (image only, text only, image + text) by 0.2 Recall@1."""
    from diffusers_cir.retrieval import compose_queries

    argv = method_args(method, tiny_data, tmp_path / "model") + [
        "--train-batch-size", "128", "--learning-rate", "2e-3", "--max-train-steps", "100",
        "--checkpointing-steps", "100000", "--text-feature-cache-size", "10000",
    ]
    main(parse_args(argv))
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "model")
    assert type(pipe).__name__ == {"clip4cir": "Clip4CirPipeline", "scot": "SCOTPipeline", "mtst": "MTSTPipeline"}[method]
    test = tiny_world.triplets("test")
    references = tiny_world.image_embeds[torch.from_numpy(test.reference_indices)]
    recall = tiny_world.recall_at_k(compose_queries(pipe, test.modification_texts, reference_embeds=references), test)
    baselines = {name: tiny_world.recall_at_k(q, test)["recall_at1"] for name, q in tiny_world.baseline_queries(test).items()}
    print(f"{method} R@1 {recall['recall_at1']:.3f}; baselines {baselines}")
    assert recall["recall_at1"] >= max(baselines.values()) + 0.2, (recall, baselines)


# --------------------------------------------------------------------------------------------- resume
def _equal(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path, single_thread):
    """MTST (two hops, dropout, label smoothing, reverse branch), an EMA, a cosine schedule and the block shuffle."""
    argv = ["--train-batch-size", "16", "--learning-rate", "1e-3", "--max-train-steps", "6", "--checkpointing-steps", "3",
            "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--use-ema", "--ema-decay", "0.9",
            "--shuffle-buffer-size", "100", "--seed", "7"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(parse_args(method_args("mtst", tiny_data, straight) + argv))
    first = main(parse_args(method_args("mtst", tiny_data, resumed) + argv + ["--stop-after-steps", "3"]))
    assert first["stopped_early"] and not (resumed / "model_index.json").exists()
    second = main(parse_args(method_args("mtst", tiny_data, resumed) + argv + ["--resume-from-checkpoint", "latest"]))
    assert second["global_step"] == 6
    _equal(straight / "checkpoint-6" / "model.safetensors", resumed / "checkpoint-6" / "model.safetensors")
    _equal(straight / "fusion_head" / "diffusion_pytorch_model.safetensors",
           resumed / "fusion_head" / "diffusion_pytorch_model.safetensors")
    # it trained between the checkpoints, and the saved head is the EMA, not the raw weights
    step3 = load_file(str(straight / "checkpoint-3" / "model.safetensors"))
    step6 = load_file(str(straight / "checkpoint-6" / "model.safetensors"))
    assert any(not torch.equal(step3[key], step6[key]) for key in step3)
    saved = load_file(str(straight / "fusion_head" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(saved[key], step6[key]) for key in saved)


# --------------------------------------------------------------------------------------------- LoRA
def test_lora_on_the_text_tower_is_merged_into_the_saved_tower(tiny_data, tmp_path, single_thread):
    from transformers import CLIPTextModelWithProjection

    argv = method_args("clip4cir", tiny_data, tmp_path / "lora") + [
        "--train-batch-size", "16", "--learning-rate", "1e-2", "--max-train-steps", "3", "--lora-text-encoder",
        "--lora-rank", "2", "--checkpointing-steps", "100000"]
    main(parse_args(argv))
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "lora")
    original = CLIPTextModelWithProjection.from_pretrained(Path(tiny_data) / "text_encoder")
    assert type(pipe.text_encoder) is CLIPTextModelWithProjection  # merged: a plain tower, no peft inside
    changed = [name for name, value in pipe.text_encoder.state_dict().items()
               if not torch.equal(value, original.state_dict()[name])]
    assert changed and all("self_attn" in name or "mlp" in name for name in changed)


def test_bf16_run_saves_the_frozen_towers_as_they_were_stored(tiny_data, tmp_path, single_thread):
    """The frozen towers train in bfloat16; casting them back to float32 on save would lose their low mantissa bits."""
    from transformers import CLIPTextModelWithProjection

    argv = method_args("clip4cir", tiny_data, tmp_path / "bf16") + [
        "--train-batch-size", "16", "--max-train-steps", "2", "--mixed-precision", "bf16",
        "--checkpointing-steps", "100000"]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        main(parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    saved = load_file(str(tmp_path / "bf16" / "text_encoder" / "model.safetensors"))
    original = CLIPTextModelWithProjection.from_pretrained(Path(tiny_data) / "text_encoder").state_dict()
    assert all(saved[name].dtype == torch.float32 and torch.equal(saved[name], original[name]) for name in saved)


def _clip_checkpoint(folder: Path) -> str:
    """A tiny CLIP checkpoint (both towers, tokenizer, processor), as `openai/clip-vit-*` folders are."""
    from tiny_components import tiny_image_processor
    from transformers import CLIPConfig, CLIPModel

    from diffusers_cir.utils import build_offline_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "max_position_embeddings": 77, "projection_dim": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    build_offline_clip_tokenizer().save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    return str(folder)


def test_scot_on_text_triplets_with_pixels_and_lora_on_the_image_tower(tmp_path, single_thread):
    """The text objective on the text-triplet layout's image configuration; the adapted image tower is the gallery's."""
    from pipeline_tester import picture

    from diffusers_cir.data.pictures import png_bytes
    from diffusers_cir.data.text_triplets import write_text_triplets

    clip = _clip_checkpoint(tmp_path / "clip")
    colors = ["red", "blue", "green", "black", "white", "orange"]
    columns = {"id": [f"r{i}" for i in range(12)], "image": [{"bytes": png_bytes(picture(i)), "path": None} for i in range(12)],
               "caption": [f"a {colors[i % 6]} shape" for i in range(12)], "modification_text": ["make it yellow"] * 12,
               "modified_caption": [f"a yellow shape number {i}" for i in range(12)]}
    write_text_triplets(tmp_path / "data", columns)
    argv = ["--method", "scot", "--pretrained-model-name-or-path", clip, "--train-data-dir", str(tmp_path / "data"),
            "--train-batch-size", "4", "--learning-rate", "1e-2", "--max-train-steps", "2", "--lora-image-encoder",
            "--checkpointing-steps", "100000", "--report-to", "none", "--output-dir", str(tmp_path / "scot")]
    summary = main(parse_args(argv))
    assert summary["global_step"] == 2
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "scot")
    from transformers import CLIPVisionModelWithProjection

    original = CLIPVisionModelWithProjection.from_pretrained(clip)
    assert type(pipe.image_encoder) is CLIPVisionModelWithProjection
    assert any(not torch.equal(value, original.state_dict()[name]) for name, value in pipe.image_encoder.state_dict().items())
    assert pipe.encode_image([picture(0)]).shape == (1, 16)


def test_a_run_on_pixels_trains_and_saves_with_target_pad(tmp_path, single_thread):
    """--target-ratio asks for target pad: the saved pipeline preprocesses its queries and gallery with it."""
    from pipeline_tester import picture

    from diffusers_cir import TargetPadImageProcessor
    from diffusers_cir.data.pictures import png_bytes
    from diffusers_cir.data.text_triplets import write_text_triplets

    clip = _clip_checkpoint(tmp_path / "clip")
    columns = {"id": [f"r{i}" for i in range(4)], "image": [{"bytes": png_bytes(picture(i, (60, 30))), "path": None}
                                                            for i in range(4)],
               "caption": ["a shape"] * 4, "modification_text": ["make it yellow"] * 4,
               "modified_caption": [f"a yellow shape number {i}" for i in range(4)]}
    write_text_triplets(tmp_path / "data", columns)
    argv = ["--method", "scot", "--pretrained-model-name-or-path", clip, "--train-data-dir", str(tmp_path / "data"),
            "--train-batch-size", "4", "--max-train-steps", "1", "--target-ratio", "1.5", "--checkpointing-steps",
            "100000", "--report-to", "none", "--output-dir", str(tmp_path / "scot")]
    main(parse_args(argv))
    processor = AutoCIRPipeline.from_pretrained(tmp_path / "scot").image_processor
    assert isinstance(processor, TargetPadImageProcessor) and processor.target_ratio == 1.5


def _preprocessing(method: str, reads_pixels: bool, processor=None, **flags):
    from argparse import Namespace

    from tiny_components import tiny_image_processor

    from diffusers_cir.training.fusion_components import Encoders, apply_image_preprocessing
    from diffusers_cir.training.fusion_methods import FUSION_METHODS

    args = Namespace(**{"image_preprocessing": None, "target_ratio": None, **flags})
    parts = Encoders(None, None, image_encoder=object(), image_processor=processor or tiny_image_processor())
    apply_image_preprocessing(args, parts, FUSION_METHODS[method], reads_pixels)
    return parts.image_processor


def test_the_default_preprocessing_is_target_pad_only_for_clip4cir_on_pixels():
    from transformers import BlipImageProcessor, CLIPImageProcessorPil

    from diffusers_cir import TargetPadImageProcessor
    from diffusers_cir.retrieval.image_processing_targetpad import IMAGE_PREPROCESSINGS
    from diffusers_cir.training.fusion_arguments import IMAGE_PREPROCESSINGS as CHOICES

    assert CHOICES == IMAGE_PREPROCESSINGS
    assert _preprocessing("clip4cir", True).target_ratio == 1.25  # the authors' default
    assert not isinstance(_preprocessing("clip4cir", False), TargetPadImageProcessor)  # embeddings: the encoders' own
    assert not isinstance(_preprocessing("scot", True), TargetPadImageProcessor)
    assert not isinstance(_preprocessing("clip4cir", True, image_preprocessing="clip"), TargetPadImageProcessor)
    assert _preprocessing("mtst", False, image_preprocessing="targetpad").target_ratio == 1.25
    padded = TargetPadImageProcessor(target_ratio=2.0)
    assert _preprocessing("scot", False, padded) is padded  # a loaded folder keeps its processor
    assert type(_preprocessing("scot", False, padded, image_preprocessing="clip")) is CLIPImageProcessorPil
    blip = BlipImageProcessor(size={"height": 32, "width": 32})
    assert _preprocessing("clip4cir", True, blip) is blip  # BLIP-2 towers: their square resize stays
    with pytest.raises(ValueError, match="--image-preprocessing targetpad: .*use 'clip' preprocessing"):
        _preprocessing("clip4cir", True, blip, image_preprocessing="targetpad")


# --------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_process_accelerate_launch_trains_on_both_ranks_and_saves_once(tiny_data, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = method_args("clip4cir", tiny_data, output) + [
        "--train-batch-size", "8", "--max-train-steps", "4", "--checkpointing-steps", "2", "--shuffle-buffer-size", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               ACCELERATE_USE_CPU="true")
    result = subprocess.run(launcher + [str(SCRIPT)] + argv, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    states = [load_state_files(output / "checkpoint-4", f"loop_state_{rank}") for rank in (0, 1)]
    # each rank read its own shards (2 of the 4) and drew its own dropout masks
    assert [state["objects"]["training"]["loader"]["num_rows"] for state in states] == [4 * 8, 4 * 8]
    assert not torch.equal(*(state["objects"]["dropout_generator"]["state"] for state in states))
    assert log.count("Saved pipeline to") == 1
    assert type(AutoCIRPipeline.from_pretrained(output)).__name__ == "Clip4CirPipeline"
    shutil.rmtree(output)


# --------------------------------------------------------------------------------------------- the command line
def _error(argv: list[str], tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv + ["--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def test_argument_mistakes_are_one_line_errors(tmp_path, capsys):
    data = ["--train-data-dir", str(tmp_path)]
    assert "exactly one of --pretrained-model-name-or-path" in _error(data, tmp_path, capsys)
    line = _error(data + ["--open-clip-model", "RN50x4", "--objective", "text", "--layout", "synthtriplets"], tmp_path,
                  capsys)
    assert "--objective text reads modified captions: it needs --layout text_triplets" in line
    line = _error(data + ["--open-clip-model", "RN50x4", "--method", "scot", "--reverse-text-weight", "0.4"], tmp_path,
                  capsys)
    assert "--reverse-text-weight" in line and "--objective image" in line
    assert "invalid choice" in _error(data + ["--open-clip-model", "RN50x4", "--method", "clip5cir"], tmp_path, capsys)
    line = _error(data + ["--open-clip-model", "RN50x4", "--image-preprocessing", "clip", "--target-ratio", "1.5"],
                  tmp_path, capsys)
    assert "--target-ratio 1.5 is target pad's ratio" in line
    assert "--target-ratio" in _error(data + ["--open-clip-model", "RN50x4", "--target-ratio", "0.9"], tmp_path, capsys)


def test_help_gives_each_method_its_defaults_and_their_source():
    from diffusers_cir.training.fusion_arguments import build_argument_parser

    scot = build_argument_parser("scot")
    assert scot.get_default("objective") == "text" and scot.get_default("caption_negatives") is True
    text = " ".join(scot.format_help().split())
    assert "SCOT (paper: the original caption is a negative)" in text and "our choice (CLIP4Cir's value)" in text
    mtst = build_argument_parser("mtst")
    assert mtst.get_default("reverse_text_weight") == 0.4 and mtst.get_default("label_smoothing") == 0.1
    assert mtst.get_default("head") == "two-hop" and "MTST (authors' code, loss_p2p)" in " ".join(mtst.format_help().split())
    clip4cir = build_argument_parser("clip4cir")
    assert clip4cir.get_default("learning_rate") == 2e-5 and clip4cir.get_default("train_batch_size") == 4096
    assert "CLIP4Cir's Combiner stage" in " ".join(clip4cir.format_help().split())
    assert "Default: targetpad when the run encodes images (the CLIP4Cir authors' default" in " ".join(
        clip4cir.format_help().split())
    assert "Default: the encoders' own (our choice" in " ".join(scot.format_help().split())
    args = parse_args(["--method", "mtst", "--open-clip-model", "RN50x4", "--train-data-dir", "d", "--output-dir",
                       str(Path(os.environ.get("TMPDIR", "/tmp")) / f"unused-{np.random.randint(1 << 30)}")])
    assert args.reverse_text_weight == 0.4 and args.train_batch_size == 4096


def test_a_pipeline_folder_without_clip_towers_is_refused_by_name(tmp_path):
    from tiny_fusion import tiny_fashionblip2_pipeline

    from diffusers_cir.training.fusion_components import load_encoders

    folder = tmp_path / "fashionblip2"
    tiny_fashionblip2_pipeline().save_pretrained(folder)
    args = parse_args(["--method", "clip4cir", "--pretrained-model-name-or-path", str(folder), "--train-data-dir",
                       str(tmp_path), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="holds a FashionBLIP2Pipeline, which has no CLIP-style text tower.*"
                                         "--method fashionblip2"):
        load_encoders(args)


def test_a_run_on_target_padded_embeddings_saves_a_pipeline_that_preprocesses_the_same_way(tmp_path, single_thread):
    """examples/precompute_embeddings.py --image-preprocessing targetpad records it in the card; training on those
    embeddings saves a pipeline whose encode_image reproduces them, and a contradicting flag is refused."""
    from pipeline_tester import picture

    from diffusers_cir import TargetPadImageProcessor
    from diffusers_cir.data.pictures import png_bytes
    from diffusers_cir.data.precompute import precompute_embeddings, record_embeddings_card, transformers_embedder
    from diffusers_cir.data.schema import images_features
    from diffusers_cir.data.shards import ParquetShardWriter, record_split

    clip, data = _clip_checkpoint(tmp_path / "clip"), str(tmp_path / "data")
    images = [picture(i, (64, 32) if i % 2 else (32, 64)) for i in range(8)]  # ratio 2: padded
    with ParquetShardWriter(data, "images", "train", images_features(), rows_per_shard=8) as writer:
        for i in range(4):
            writer.add({"id": f"r{i}", "reference_image": {"bytes": png_bytes(images[2 * i]), "path": None},
                        "target_image": {"bytes": png_bytes(images[2 * i + 1]), "path": None},
                        "modification_text": f"edit {i}", "reference_caption": None, "target_caption": None})
    record_split(data, "images", images_features(), "train", 4, default=True)
    embedder = transformers_embedder(clip, image_preprocessing="targetpad")
    precompute_embeddings(data, embedder, num_workers=0, progress=False)
    record_embeddings_card(data, embedder.name, embedder.embedding_dim, image_preprocessing="targetpad",
                           target_ratio=embedder.target_ratio)
    argv = ["--method", "clip4cir", "--pretrained-model-name-or-path", clip, "--train-data-dir", data,
            "--dataset-config-name", "embeddings", "--train-batch-size", "4", "--max-train-steps", "1",
            "--checkpointing-steps", "100000", "--report-to", "none"]
    with pytest.raises(ValueError, match=r"--image-preprocessing clip contradicts the embeddings of --train-data-dir "
                                         r".*made with targetpad \(target ratio 1\.25\) preprocessing"):
        main(parse_args(argv + ["--image-preprocessing", "clip", "--output-dir", str(tmp_path / "refused")]))
    with pytest.raises(ValueError, match=r"--target-ratio 1\.5 contradicts .*targetpad \(target ratio 1\.25\)"):
        main(parse_args(argv + ["--target-ratio", "1.5", "--output-dir", str(tmp_path / "refused")]))
    main(parse_args(argv + ["--output-dir", str(tmp_path / "model")]))
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(pipe.image_processor, TargetPadImageProcessor) and pipe.image_processor.target_ratio == 1.25
    stored = datasets_rows(data)["r1"]
    encoded = torch.nn.functional.normalize(pipe.encode_image([images[2], images[3]]), dim=-1).numpy()
    np.testing.assert_allclose(encoded[0], stored["reference_image_embeds"], atol=1e-5)
    np.testing.assert_allclose(encoded[1], stored["target_image_embeds"], atol=1e-5)


def datasets_rows(folder: str) -> dict:
    import datasets

    return {row["id"]: row for row in datasets.load_dataset(folder, "embeddings", split="train", streaming=True)}
