"""benchmarks/compare_compodiff_recipes.py: its two rows share everything but what --recipe paper_stage2 sets."""

import importlib.util
from pathlib import Path

import pytest

from diffusers_cir.training.compodiff_arguments import resolve_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_compodiff_recipes",
                                                  REPO / "benchmarks" / "compare_compodiff_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rows_differ_only_in_what_the_recipe_sets(bench, tmp_path):
    args = bench.parse_args(["--steps", "300", "--train-batch-size", "64"])
    resolved = {}
    for row in ("defaults", "paper_stage2"):
        _, values, sources = resolve_args(bench.training_argv(row, "data", str(tmp_path / row), args))
        resolved[row] = (vars(values), sources)
    (defaults, _), (paper, paper_sources) = resolved["defaults"], resolved["paper_stage2"]
    differing = {key for key in defaults if key != "output_dir" and defaults[key] != paper[key]}
    # what differs is the recipe's (or the mask-free mix given for it), never the shared budget, data or model
    assert all(paper_sources[key] == "paper_stage2" or key in ("recipe", "objective_ratios", "both_drop_prob")
               for key in differing), {key: paper_sources[key] for key in differing}
    assert {"learning_rate", "adam_weight_decay", "transformer_dropout", "use_ema", "condition_dropout"} <= differing
    for values in (defaults, paper):
        assert (values["max_train_steps"], values["train_batch_size"]) == (300, 64)
        assert values["transformer_config"] == defaults["transformer_config"]
        assert values["text_encoder_name_or_path"] == defaults["text_encoder_name_or_path"]
    assert paper["objective_ratios"] == "triplet=0.4,text_to_image=0.3"  # the paper's 4:3, no masks in the world
    assert defaults["objective_ratios"] == "triplet=0.7,text_to_image=0.3,masked=0"
    assert (paper["learning_rate"], defaults["learning_rate"]) == (1e-5, 1e-4)


def test_unknown_rows_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "defaults,paper_stage9"])
    assert "paper_stage9" in capsys.readouterr().err
