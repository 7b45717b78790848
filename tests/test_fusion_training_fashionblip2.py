"""FashionBLIP-2 through the composition-network trainer (examples/train_fusion.py --method fashionblip2): it trains on
the SynthTriplets images layout with LoRA on a tiny BLIP-2's Q-Former, the saved folder holds the trained weights
(adapters merged) and loads with AutoCIRPipeline, checkpoints hold only what trains, a stopped run resumes bit for
bit, and resuming on another base model is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import picture  # noqa: E402
from tiny_fusion import tiny_fashionblip2_pipeline  # noqa: E402

from diffusers_cir import AutoCIRPipeline, FashionBLIP2Pipeline  # noqa: E402
from diffusers_cir.training.fusion_arguments import build_argument_parser, parse_args  # noqa: E402
from diffusers_cir.training.train_fusion import main  # noqa: E402

TEXTS = ["make it red", "has two dogs", "with long sleeves", "is blue", "a blue cup", "the red cup", "make it blue",
         "two red dogs"]


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A SynthTriplets images folder of 8 triplets, the tiny BLIP-2 as a checkpoint and as a FashionBLIP2Pipeline."""
    from diffusers_cir.data.shards import write_triplets

    root = tmp_path_factory.mktemp("fashionblip2")
    source = root / "source"
    source.mkdir()
    with open(source / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(TEXTS):
            picture(i).save(source / f"r{i}.png")
            picture(20 + i).save(source / f"t{i}.png")
            handle.write(json.dumps({"id": f"q{i}", "reference_image": f"r{i}.png", "target_image": f"t{i}.png",
                                     "modification_text": text}) + "\n")
    write_triplets(str(source), str(root / "data"), progress=False)
    pipe = tiny_fashionblip2_pipeline()
    for part in (pipe.model, pipe.tokenizer, pipe.image_processor):
        part.save_pretrained(root / "blip2")
    pipe.save_pretrained(root / "pipeline")
    return root


def fashionblip2_args(root: Path, pretrained: str, output: Path, *extra: str) -> list[str]:
    return ["--method", "fashionblip2", "--pretrained-model-name-or-path", str(root / pretrained), "--train-data-dir",
            str(root / "data"), "--dataset-config-name", "images", "--train-batch-size", "4", "--report-to", "none",
            "--output-dir", str(output), *extra]


def composed_loss(pipe, temperature: float = 0.07) -> float:
    """The contrastive loss of the 8 training queries against their targets, through the pipeline's own calls."""
    queries = pipe(image=[picture(i) for i in range(8)], prompt=TEXTS).image_embeds
    candidates = pipe.encode_image([picture(20 + i) for i in range(8)])
    return F.cross_entropy(queries @ candidates.T / temperature, torch.arange(8)).item()


def test_fashionblip2_trains_and_the_saved_folder_is_the_last_checkpoint_merged(blip2, tmp_path, single_thread):
    from diffusers_cir.training.fashionblip2 import FashionBLIP2Trainee, add_qformer_adapters, merged_model

    output = tmp_path / "model"
    main(parse_args(fashionblip2_args(blip2, "pipeline", output, "--learning-rate", "3e-2", "--max-train-steps", "150",
                                      "--checkpointing-steps", "150", "--lora-rank", "4",
                                      "--train-batch-size", "8")))
    loaded = AutoCIRPipeline.from_pretrained(output)
    assert type(loaded) is FashionBLIP2Pipeline and not any("lora" in name for name in loaded.model.state_dict())
    loaded.set_progress_bar_config(disable=True)
    initial = FashionBLIP2Pipeline.from_pretrained(blip2 / "pipeline")
    initial.set_progress_bar_config(disable=True)
    before, after = composed_loss(initial), composed_loss(loaded)
    print(f"fashionblip2 loss of the 8 training queries: {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)

    # The folder is the checkpoint's adapted model and head, merged: the same queries and gallery embeddings.
    start = FashionBLIP2Pipeline.from_pretrained(blip2 / "pipeline")
    trainee = FashionBLIP2Trainee(add_qformer_adapters(start.model, rank=4, alpha=8), start.matching_head)
    checkpoint = load_file(str(output / "checkpoint-150" / "model.safetensors"))
    trainee.load_trainable_state_dict(checkpoint)
    # The checkpoint holds what trains (the adapters, under peft's names without the adapter's, and the head), none
    # of the frozen BLIP-2: a small part of the whole model.
    trained = {name.replace(".default.", ".") for name, value in trainee.named_parameters() if value.requires_grad}
    trained |= {f"head.{name}" for name, _ in trainee.head.named_buffers()}
    assert set(checkpoint) == trained
    whole = trainee.state_dict()
    assert sum(value.numel() for value in checkpoint.values()) < 0.25 * sum(value.numel() for value in whole.values())
    assert (output / "checkpoint-150" / "model.safetensors").stat().st_size < 0.25 * sum(
        value.numel() * value.element_size() for value in whole.values())
    rebuilt = FashionBLIP2Pipeline(model=merged_model(trainee.model).eval(), matching_head=trainee.head.eval(),
                                   tokenizer=start.tokenizer, image_processor=start.image_processor)
    rebuilt.set_progress_bar_config(disable=True)
    query = {"image": [picture(0), picture(1)], "prompt": TEXTS[:2]}
    torch.testing.assert_close(loaded(**query).image_embeds, rebuilt(**query).image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.encode_image([picture(20)]), rebuilt.encode_image([picture(20)]), atol=1e-5, rtol=0)
    changed = [name for name, value in loaded.model.state_dict().items()
               if not torch.equal(value, initial.model.state_dict()[name])]
    assert changed and all(name.startswith("qformer.") for name in changed)  # LoRA on the Q-Former only



def test_fashionblip2_resumes_bit_for_bit_from_a_blip2_checkpoint(blip2, tmp_path, single_thread):
    """From the BLIP-2 checkpoint (a new head); the Q-Former's dropout draws from the run's saved generator."""
    argv = ["--learning-rate", "1e-2", "--max-train-steps", "4", "--checkpointing-steps", "2", "--lr-scheduler",
            "cosine", "--shuffle-buffer-size", "100", "--seed", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(parse_args(fashionblip2_args(blip2, "blip2", straight, *argv)))
    first = main(parse_args(fashionblip2_args(blip2, "blip2", resumed, *argv, "--stop-after-steps", "2")))
    assert first["stopped_early"] and not (resumed / "model_index.json").exists()
    second = main(parse_args(fashionblip2_args(blip2, "blip2", resumed, *argv, "--resume-from-checkpoint", "latest")))
    assert second["global_step"] == 4
    for name in ("checkpoint-4/model.safetensors", "model/model.safetensors",
                 "matching_head/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    step2 = load_file(str(straight / "checkpoint-2" / "model.safetensors"))
    step4 = load_file(str(straight / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(step2[key], step4[key]) for key in step2)


def test_fashionblip2_help_and_argument_mistakes(blip2, tmp_path, capsys):
    parser = build_argument_parser("fashionblip2")
    assert parser.get_default("head") == "multi-head-matching" and parser.get_default("temperature") == 0.07
    text = " ".join(parser.format_help().split())
    assert "method section could not be read" in text and "BLIP-2's initial ITC temperature" in text
    for extra, message in ((["--validation-steps", "5"], "--validation-steps"), (["--use-ema"], "--use-ema"),
                           (["--head", "combiner"], "multi-head-matching")):
        with pytest.raises(SystemExit):
            parse_args(fashionblip2_args(blip2, "blip2", tmp_path / "out", *extra))
        assert message in capsys.readouterr().err
    argv = fashionblip2_args(blip2, "blip2", tmp_path / "emb", "--max-train-steps", "1")
    argv[argv.index("images")] = "embeddings"
    with pytest.raises(ValueError, match="could not be read"):  # the folder has no embeddings configuration
        main(parse_args(argv))


def test_fashionblip2_refuses_to_resume_on_another_base(blip2, tmp_path, single_thread):
    """A checkpoint holds no frozen weights: resuming rebuilds them from --pretrained-model-name-or-path, which must be
    the base the checkpoint was made on (the same weights in another folder are fine), and the same LoRA settings."""
    import shutil

    from transformers import Blip2ForImageTextRetrieval

    from diffusers_cir.training.checkpoints import CheckpointMismatchError
    from diffusers_cir.utils.checksums import write_manifest

    argv = ["--max-train-steps", "2", "--checkpointing-steps", "1", "--train-batch-size", "2"]
    output = tmp_path / "run"
    main(parse_args(fashionblip2_args(blip2, "blip2", output, *argv, "--stop-after-steps", "1")))
    base = json.loads((output / "checkpoint-1" / "fashionblip2_base.json").read_text())
    assert base["base"] == str(blip2 / "blip2") and base["lora"]["r"] == 8

    (tmp_path / "data").symlink_to(blip2 / "data")  # the other bases below sit beside the same data
    shutil.copytree(blip2 / "blip2", tmp_path / "other")
    model = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "other")
    with torch.no_grad():  # one weight of the frozen vision tower, by the smallest step float32 takes
        weight = model.vision_model.embeddings.patch_embedding.weight
        weight[0, 0, 0, 0] = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(float("inf")))
    model.save_pretrained(tmp_path / "other")
    resume = ["--resume-from-checkpoint", "latest"]
    with pytest.raises(CheckpointMismatchError, match="checkpoint-1.*made on the base model .*blip2.*--pretrained"):
        main(parse_args(fashionblip2_args(tmp_path, "other", output, *argv, *resume)))
    with pytest.raises(CheckpointMismatchError, match="--lora-rank"):
        main(parse_args(fashionblip2_args(blip2, "blip2", output, *argv, *resume, "--lora-rank", "4")))

    shutil.copytree(output / "checkpoint-1", output / "checkpoint-0")
    (output / "checkpoint-0" / "fashionblip2_base.json").unlink()
    write_manifest(output / "checkpoint-0")
    with pytest.raises(RuntimeError, match="checkpoint-0.*fashionblip2_base.json is missing"):
        main(parse_args(fashionblip2_args(blip2, "blip2", output, *argv, "--resume-from-checkpoint", "checkpoint-0")))

    shutil.copytree(blip2 / "blip2", tmp_path / "moved")  # the same base, elsewhere
    summary = main(parse_args(fashionblip2_args(tmp_path, "moved", output, *argv, *resume)))
    assert summary["global_step"] == 2 and (output / "model_index.json").is_file()


@pytest.mark.slow
def test_two_process_launch_splits_the_data_saves_once_and_resumes_bit_for_bit(blip2, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): each rank reads its half of the 8 triplets, checkpoints hold
    only what trains, one pipeline is saved, and a run resumed from the first checkpoint (both ranks' data positions
    and dropout generators) ends with the weights of the uninterrupted one."""
    import os
    import shutil
    import socket
    import subprocess

    from diffusers_cir.training.state import load_state_files

    repo = Path(__file__).resolve().parents[1]

    def launch(output: Path, *extra: str) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                    "--dynamo_backend", "no", str(repo / "examples" / "train_fusion.py")]
        argv = fashionblip2_args(blip2, "blip2", output, "--train-batch-size", "2", "--learning-rate", "1e-2",
                                 "--max-train-steps", "4", "--checkpointing-steps", "2", "--lr-scheduler", "cosine",
                                 "--shuffle-buffer-size", "100", "--seed", "3", *extra)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   ACCELERATE_USE_CPU="true")
        result = subprocess.run(launcher + argv, capture_output=True, text=True, env=env, timeout=400, cwd=repo)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-6000:]
        assert "DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
        return log

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = launch(straight)
    assert log.count("Saved pipeline to") == 1
    states = [load_state_files(straight / "checkpoint-4", f"loop_state_{rank}") for rank in (0, 1)]
    for state in states:  # 4 steps of 2 rows: two epochs of the rank's 4 triplets (all 8 would be one epoch)
        loader = state["objects"]["training"]
        assert loader["loader"]["num_rows"] == 8 and (loader["epoch"], loader["batches"]) == (1, 2)
    assert not torch.equal(*(state["objects"]["dropout_generator"]["state"] for state in states))
    checkpoint = load_file(str(straight / "checkpoint-4" / "model.safetensors"))
    assert all(key.startswith("head.") or ".lora_" in key for key in checkpoint)  # no "module." prefix, no base
    assert type(AutoCIRPipeline.from_pretrained(straight)) is FashionBLIP2Pipeline

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    log = launch(resumed, "--resume-from-checkpoint", "latest")
    assert "Resuming from checkpoint" in log
    for name in ("checkpoint-4/model.safetensors", "model/model.safetensors",
                 "matching_head/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    step2 = load_file(str(straight / "checkpoint-2" / "model.safetensors"))
    assert any(not torch.equal(step2[key], checkpoint[key]) for key in step2)
