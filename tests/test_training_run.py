"""End-to-end runs of the CompoDiff training script: it learns to compose on the synthetic world, a killed run resumes
to exactly the weights of an uninterrupted one, and a 2-process ``accelerate launch`` trains and saves once."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_cir import CompoDiffPipeline
from diffusers_cir.demo import build_world, world_training_data_argv, write_training_data
from diffusers_cir.training.state import load_state_files

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_compodiff.py"
SMALL_MODEL = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "num_cross_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_world():
    return build_world("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_data(tiny_world, tmp_path_factory):
    return write_training_data(tiny_world, tmp_path_factory.mktemp("tiny_world"), num_train_triplets=20_000)


def common_args(data: str, output: str) -> list[str]:
    return world_training_data_argv(data, SMALL_MODEL) + ["--report_to", "none", "--output_dir", output]


def run_script(argv: list[str], env_extra: dict | None = None, launcher: list[str] | None = None, timeout: int = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    command = (launcher or [sys.executable]) + [str(SCRIPT)] + argv
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


# --------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_compodiff_learns_to_compose_held_out_combinations(tiny_world, tiny_data, tmp_path):
    """The small-scale version of the 10-minute check: on held-out compositions the trained prior must reach
    Recall@1 >= 0.5 and beat the best baseline (image only, text only, image+text sum) by >= 0.15."""
    from diffusers_cir.retrieval import compose_queries
    from diffusers_cir.training import main, parse_args

    output = str(tmp_path / "model")
    argv = common_args(tiny_data, output) + [
        "--learning_rate", "3e-3", "--lr_warmup_steps", "50", "--train_batch_size", "128",
        "--text_drop_prob", "0.05", "--image_drop_prob", "0.05", "--both_drop_prob", "0.05",
        "--max_train_steps", "1500", "--checkpointing_steps", "100000", "--text_embedding_cache_size", "4096",
        "--shuffle_buffer_size", "2000", "--use_ema", "--ema_decay", "0.995",
    ]
    main(parse_args(argv))  # the process's thread setting: CI gives each test worker one core

    pipe = CompoDiffPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    test = tiny_world.triplets("test")
    references = tiny_world.image_embeds[torch.from_numpy(test.reference_indices)]
    queries = compose_queries(pipe, test.modification_texts, reference_embeds=references, batch_size=256,
                              guidance_scale=1.5, image_guidance_scale=1.5, num_samples_per_query=4)
    compodiff = tiny_world.recall_at_k(queries, test)["recall_at1"]
    baselines = {name: tiny_world.recall_at_k(q, test)["recall_at1"] for name, q in tiny_world.baseline_queries(test).items()}
    best = max(baselines.values())
    print(f"CompoDiff R@1 {compodiff:.3f}; baselines {baselines}")
    assert compodiff >= 0.5, (compodiff, baselines)
    assert compodiff >= best + 0.15, (compodiff, baselines)


# --------------------------------------------------------------------------------------------- resume
def _weights(path: Path) -> dict:
    return load_file(str(path))


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path):
    argv = [
        "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--lr_scheduler", "cosine", "--train_batch_size", "16",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--use_ema", "--ema_decay", "0.9", "--ema_warmup",
        "--shuffle_buffer_size", "0", "--seed", "7",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(common_args(tiny_data, str(straight)) + argv)
    first = run_script(common_args(tiny_data, str(resumed)) + argv + ["--stop_after_steps", "3"])
    assert "Stopped after 3 steps" in first.stdout + first.stderr
    assert (resumed / "checkpoint-3").is_dir() and not (resumed / "model_index.json").exists()
    # The interrupted run left exactly what a run killed after its step-3 checkpoint leaves.
    torch.testing.assert_close(_weights(resumed / "checkpoint-3" / "model.safetensors"),
                               _weights(straight / "checkpoint-3" / "model.safetensors"), rtol=0, atol=0)
    second = run_script(common_args(tiny_data, str(resumed)) + argv + ["--resume_from_checkpoint", "latest"])
    assert "Resuming from checkpoint" in second.stdout + second.stderr

    # Training weights (optimizer step by step) and the saved EMA weights are bit-identical.
    training_straight = _weights(straight / "checkpoint-6" / "model.safetensors")
    training_resumed = _weights(resumed / "checkpoint-6" / "model.safetensors")
    assert training_straight.keys() == training_resumed.keys()
    for key in training_straight:
        assert torch.equal(training_straight[key], training_resumed[key]), key
    final_straight = _weights(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    final_resumed = _weights(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in final_straight:
        assert torch.equal(final_straight[key], final_resumed[key]), key
    # Training happened between the checkpoints, and the EMA is not the raw weights.
    assert any(not torch.equal(training_straight[k], _weights(straight / "checkpoint-3" / "model.safetensors")[k])
               for k in training_straight)
    assert any(not torch.equal(final_straight[k], training_straight[k]) for k in final_straight)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_complete_checkpoint(tiny_data, tmp_path):
    """A run killed while it trains (SIGKILL, no clean-up) resumes from its last complete checkpoint."""
    output = tmp_path / "killed"
    argv = common_args(tiny_data, str(output)) + [
        "--train_batch_size", "16", "--max_train_steps", "100000", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--shuffle_buffer_size", "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, str(SCRIPT)] + argv, cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        def reached_step_6():
            # any complete checkpoint at or after step 6: with --checkpoints_total_limit 2, checkpoint-6 itself is
            # deleted by step 10, which a fast run reaches between two polls
            steps = [int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
            return any(step >= 6 for step in steps)

        deadline = time.time() + 240
        while time.time() < deadline and not reached_step_6():
            time.sleep(0.2)
        assert reached_step_6(), "the run did not reach step 6"
    finally:
        process.kill()
        process.wait()
    complete = sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-") and "." not in p.name)
    assert 1 <= len(complete) <= 2  # --checkpoints_total_limit
    last = max(int(name.split("-")[1]) for name in complete)
    argv[argv.index("--max_train_steps") + 1] = str(last + 2)
    result = run_script(argv + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from checkpoint {output / f'checkpoint-{last}'}" in result.stdout + result.stderr
    assert (output / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_process_accelerate_launch_trains_on_both_ranks_and_saves_once(tiny_data, tmp_path):
    import socket

    with socket.socket() as probe:  # a free port: other test runs may use accelerate's default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "ddp"
    # One machine, several CPU processes: accelerate's multi-process launcher (torchrun) with ACCELERATE_USE_CPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    argv = common_args(tiny_data, str(output)) + [
        "--train_batch_size", "8", "--max_train_steps", "4", "--checkpointing_steps", "2", "--shuffle_buffer_size", "0",
    ]
    result = run_script(argv, env_extra={"ACCELERATE_USE_CPU": "true"}, launcher=launcher, timeout=400)
    log = result.stdout + result.stderr
    assert "DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    # Each rank reads its own half of the 4 training shards and checkpoints its own data position.
    assert "Rank 0 reads 2 of the 4 training shards" in log and "Rank 1 reads 2 of the 4 training shards" in log
    states = [load_state_files(output / "checkpoint-4", f"loop_state_{rank}") for rank in (0, 1)]
    assert [state["objects"]["triplets"]["loader"]["num_rows"] for state in states] == [4 * 6, 4 * 6]  # 8 rows: 6 triplets
    # Each rank draws its own training noise, and saved its own generator state.
    assert not torch.equal(*(state["objects"]["noise_generator"]["state"] for state in states))
    # One pipeline, saved once, that loads.
    assert log.count("Saved pipeline to") == 1
    assert (output / "model_index.json").is_file()
    pipe = CompoDiffPipeline.from_pretrained(str(output))
    assert pipe.transformer.config.num_cross_attention_heads == 2
    shutil.rmtree(output)
