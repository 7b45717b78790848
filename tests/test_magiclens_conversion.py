"""Converting released MagicLens checkpoints: every key and shape of the full-size trees, the stated size, the command
and `AutoCIRPipeline` on a `.pkl`."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from diffusers_cir import AutoCIRPipeline, MagicLensPipeline
from diffusers_cir.cli import main
from diffusers_cir.conversion.flax_checkpoint import UnsafePickleError
from diffusers_cir.conversion.magiclens import (
    MAGICLENS_SIZES,
    MagicLensConversionError,
    build_magiclens_components,
    convert_magiclens_checkpoint_to_pipeline,
    convert_magiclens_state_dict,
    infer_magiclens_architecture,
    load_magiclens_checkpoint,
)

TINY = FIXTURES / "magiclens_tiny"
RELEASED = json.loads((FIXTURES / "magiclens_released_checkpoint_keys.json").read_text())

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_flat():
    return load_magiclens_checkpoint(TINY / "checkpoint.pkl")


@pytest.mark.parametrize("size", ["base", "large"])
def test_every_key_and_shape_of_the_released_trees_is_mapped(size):
    """The full-size trees on the meta device (no memory): every key lands in a parameter of the right shape, every
    parameter is filled, and the architecture read from the shapes is the released one."""
    shapes = RELEASED[size]["keys"]
    flat = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    assert infer_magiclens_architecture(shapes) == MAGICLENS_SIZES[size]
    converted = convert_magiclens_state_dict(flat)
    mapped = sum(len(state) for state in converted.values())
    assert mapped == len(shapes) - 1  # all but params/clip/logit_scale
    models = build_magiclens_components(flat)  # refuses missing, unexpected or misshapen weights
    count = sum(parameter.numel() for model in models.values() for parameter in model.parameters())
    assert count == RELEASED[size]["num_params"] - 1  # logit_scale is a single number
    assert models["fusion"].config.embed_dim == models["image_encoder"].config.projection_dim


def test_the_other_size_is_refused(tmp_path):
    with pytest.raises(MagicLensConversionError, match="model_size='base'") as error:
        convert_magiclens_checkpoint_to_pipeline(TINY / "checkpoint.pkl", tmp_path / "out", model_size="base")
    assert "vision.hidden_size 768 vs 128" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_config_file_that_does_not_describe_the_weights_is_refused(tmp_path):
    config = json.loads((TINY / "config.json").read_text())
    config["magiclens"]["num_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MagicLensConversionError, match="fusion.num_layers 3 vs 2"):
        convert_magiclens_checkpoint_to_pipeline(TINY / "checkpoint.pkl", tmp_path / "out", config_path=tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(MagicLensConversionError, match="'magiclens' and 'clip' sections"):
        convert_magiclens_checkpoint_to_pipeline(TINY / "checkpoint.pkl", tmp_path / "out", config_path=tmp_path / "config.json")


def test_unknown_and_missing_weights_are_refused(tiny_flat):
    with pytest.raises(MagicLensConversionError, match="not MagicLens weights"):
        convert_magiclens_state_dict({**tiny_flat, "params/extra/kernel": torch.zeros(2)})
    incomplete = {key: value for key, value in tiny_flat.items() if not key.endswith("pool_attn_ln/bias")}
    with pytest.raises(MagicLensConversionError, match=r"missing \['pooler.norm.bias'\]"):
        build_magiclens_components(incomplete)
    misshapen = {**tiny_flat, "params/clip/text/ln_final/bias": torch.zeros(9)}
    with pytest.raises(MagicLensConversionError, match="final_layer_norm.bias"):
        build_magiclens_components(misshapen)


def test_layer_norm_gains_and_transposes_land_where_the_reference_puts_them(tiny_flat):
    models = build_magiclens_components(tiny_flat)
    fusion = models["fusion"]
    scale = tiny_flat["params/multimodal_encoder/x_layers_1/ff_layer/layer_norm/scale"]
    torch.testing.assert_close(fusion.layers[1].feed_forward.norm.weight, 1 + scale)
    post = tiny_flat["params/contrastive_multimodal_pooler/pool_attn/post/w"]  # [D, heads, head_dim], no transpose
    torch.testing.assert_close(fusion.pooler.attention.to_out.weight, post.reshape(post.shape[0], -1))
    kernel = tiny_flat["params/clip/visual/conv1/kernel"]  # HWIO
    torch.testing.assert_close(models["image_encoder"].vision_model.embeddings.patch_embedding.weight, kernel.permute(3, 2, 0, 1))
    text_pos = models["text_encoder"].text_model.embeddings.position_ids
    assert torch.equal(text_pos, torch.arange(text_pos.shape[-1])[None])  # rebuilt after the meta-device build


def test_convert_command(tmp_path, capsys):
    output = tmp_path / "magiclens"
    argv = ["convert", "magiclens", "--checkpoint-path", str(TINY / "checkpoint.pkl"), "--config-path",
            str(TINY / "config.json"), "--output", str(output)]
    assert main(argv) == 0
    assert "MagicLensPipeline" in capsys.readouterr().out
    pipe = AutoCIRPipeline.from_pretrained(output)
    assert type(pipe) is MagicLensPipeline and pipe.embedding_dim == 32
    assert pipe.image_processor.squash_size == 224 and pipe.image_processor.image_size == 32

    assert main(argv) == 2  # the folder holds a conversion: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--dtype", "bf16"]) == 0
    for weights in output.glob("*/*.safetensors"):
        assert {tensor.dtype for tensor in load_file(str(weights)).values()} == {torch.bfloat16}, weights
    capsys.readouterr()

    assert main(argv[:4] + ["--model-size", "large", "--output", str(tmp_path / "other")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("diffusers-cir convert magiclens: error: ") and message.count("\n") == 1
    assert "model_size='large' describes" in message
    with pytest.raises(SystemExit) as exit_info:  # argparse: one statement of what the file is
        main(argv + ["--model-size", "base"])
    assert exit_info.value.code == 2


def test_auto_pipeline_converts_a_pkl_file_or_its_folder_once(tmp_path):
    cache = tmp_path / "cache"
    from_file = AutoCIRPipeline.from_pretrained(TINY / "checkpoint.pkl", conversion_cache_dir=cache)
    folder = tmp_path / "release"
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns("images", "io.*"))
    from_folder = AutoCIRPipeline.from_pretrained(folder, conversion_cache_dir=cache)  # uses its config.json
    assert type(from_file) is type(from_folder) is MagicLensPipeline
    assert from_file.fingerprint == from_folder.fingerprint
    assert len([path for path in cache.iterdir() if path.is_dir()]) == 2
    AutoCIRPipeline.from_pretrained(folder, conversion_cache_dir=cache)  # cached: no third conversion
    assert len([path for path in cache.iterdir() if path.is_dir()]) == 2
    with pytest.raises(MagicLensConversionError, match="model_size='large'"):
        AutoCIRPipeline.from_pretrained(folder, model_size="large", conversion_cache_dir=cache)


def test_auto_pipeline_never_unpickles_a_file_that_looks_like_a_checkpoint(tmp_path):
    marker = tmp_path / "ran"

    class Trap:
        def __reduce__(self):
            return (shutil.copy, (str(TINY / "config.json"), str(marker)))

    path = tmp_path / "magic_lens_clip_large.pkl"
    path.write_bytes(pickle.dumps((b"\x81\xa6params\x83\xa4clip", Trap()), protocol=4))
    with pytest.raises(UnsafePickleError, match="magic_lens_clip_large.pkl"):
        AutoCIRPipeline.from_pretrained(path, conversion_cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_the_model_card_commands_parse_and_its_parameter_counts_are_the_released_ones():
    import re
    import shlex

    from diffusers_cir.cli import build_parser

    card = (FIXTURES.parents[1] / "hub" / "models" / "magiclens" / "README.md").read_text()
    commands = [line for line in card.splitlines() if line.startswith("diffusers-cir ")]
    assert len(commands) >= 4
    parser = build_parser()
    from diffusers_cir.evaluation import get_protocol

    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # argparse exits on a flag the command line does not know
        if getattr(args, "protocol", None) is not None:
            get_protocol(args.benchmark, args.protocol)  # a protocol the benchmark has
    for size, name in (("base", "MagicLens-B"), ("large", "MagicLens-L")):
        row = re.search(rf"^\| {name} \| [^|]+ \| ([\d,]+) \|", card, re.MULTILINE)
        assert row and int(row[1].replace(",", "")) == RELEASED[size]["num_params"] - 1


def test_a_converted_folder_has_a_card_saying_what_it_is(tmp_path):
    from huggingface_hub import ModelCard

    from diffusers_cir.conversion.magiclens import _conversion_card

    output = tmp_path / "magiclens-tiny"
    convert_magiclens_checkpoint_to_pipeline(TINY / "checkpoint.pkl", output, config_path=TINY / "config.json")
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "cc-by-4.0" and "magiclens" in card.data.tags
    assert card.text.lstrip().startswith("# magiclens-tiny\n") and "Zhang et al., ICML 2024" in card.text
    assert "diffusers-cir convert magiclens --checkpoint-path" in card.text
    assert "29.6" not in card.text  # published numbers only for the released architectures
    large = _conversion_card("magic_lens_clip_large.pkl", "out", "large", None, None, MAGICLENS_SIZES["large"])
    assert "CIRCO mAP@5 29.6" in large.notes[0] and "CIRR R@1 30.1" in large.notes[0] and large.model_name == "out"
