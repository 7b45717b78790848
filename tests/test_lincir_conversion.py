"""The projection model and the conversion of released phi / Pic2Word checkpoints."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from diffusers_cir import LinCIRPipeline, TextualInversionProjection
from diffusers_cir.conversion.lincir import (
    LinCIRConversionError,
    build_lincir_pipeline,
    convert_lincir_phi_checkpoint,
    load_original_phi_checkpoint,
)
from diffusers_cir.utils import build_offline_clip_tokenizer

LINCIR_TINY = FIXTURES / "lincir_tiny"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_lincir_to_diffusers.py"


# Every test here runs on one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def lincir_sequential(input_dim, hidden_dim, output_dim, num_hidden=2):
    """The released phi: nn.Sequential(Linear, GELU, Dropout, ..., Linear)."""
    layers, width = [], input_dim
    for _ in range(num_hidden):
        layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(0.5)]
        width = hidden_dim
    layers.append(nn.Linear(hidden_dim, output_dim))
    return nn.Sequential(*layers).eval()


class Pic2WordProjection(nn.Module):
    """Pic2Word's IM2TEXT layout: blocks of (Linear, Dropout, ReLU) in `layers`, then `fc_out`."""

    def __init__(self, embed_dim, middle_dim, output_dim, n_layer):
        super().__init__()
        self.fc_out = nn.Linear(middle_dim, output_dim)
        blocks, width = [], embed_dim
        for _ in range(n_layer):
            blocks.append(nn.Sequential(nn.Linear(width, middle_dim), nn.Dropout(0.1), nn.ReLU()))
            width = middle_dim
        self.layers = nn.Sequential(*blocks)

    def forward(self, x):
        return self.fc_out(self.layers(x))


def _perturbed(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module


# ------------------------------------------------------------------------------------------- the model


def test_projection_layers_dropout_and_validation():
    phi = TextualInversionProjection(input_dim=8, hidden_dim=16, output_dim=12, num_hidden_layers=3, dropout=0.5)
    assert [tuple(layer.weight.shape) for layer in phi.hidden_layers] == [(16, 8), (16, 16), (16, 16)]
    x = torch.randn(64, 8)
    phi.train()
    assert not torch.equal(phi(x).pseudo_tokens, phi(x).pseudo_tokens)  # dropout is active while training
    phi.eval()
    assert torch.equal(phi(x).pseudo_tokens, phi(x)[0]) and phi(x, return_dict=False)[0].shape == (64, 12)
    with pytest.raises(ValueError, match=r"`image_embeds` must be a tensor of shape \(batch_size, 8\), got \(64, 9\)"):
        phi(torch.randn(64, 9))
    with pytest.raises(ValueError, match="`num_hidden_layers`"):
        TextualInversionProjection(8, 16, 12, num_hidden_layers=0)
    with pytest.raises(ValueError, match="`dropout`"):
        TextualInversionProjection(8, 16, 12, dropout=1.0)


def test_normalize_input_makes_the_projection_scale_invariant():
    phi = TextualInversionProjection(8, 16, 12, normalize_input=True).eval()
    x = torch.randn(4, 8)
    assert torch.allclose(phi(x).pseudo_tokens, phi(3.5 * x).pseudo_tokens, atol=1e-6)
    plain = TextualInversionProjection(8, 16, 12, normalize_input=False).eval()
    plain.load_state_dict(phi.state_dict())
    assert not torch.allclose(plain(x).pseudo_tokens, plain(3.5 * x).pseudo_tokens, atol=1e-3)


# ------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("num_hidden", [1, 2, 3])
def test_lincir_layout_any_depth(num_hidden, tmp_path):
    reference = _perturbed(lincir_sequential(6, 20, 10, num_hidden))
    checkpoint = {"Phi": {f"layers.{k}": v for k, v in reference.state_dict().items()}, "epoch": 7}
    torch.save(checkpoint, tmp_path / "phi.pt")
    phi = convert_lincir_phi_checkpoint(tmp_path / "phi.pt", output_dir=tmp_path / "converted")
    assert phi.config.num_hidden_layers == num_hidden and phi.config.activation == "gelu" and phi.config.dropout == 0.5
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(phi(x).pseudo_tokens, reference(x), atol=1e-6)
        reloaded = TextualInversionProjection.from_pretrained(tmp_path / "converted")
        assert torch.allclose(reloaded(x).pseudo_tokens, reference(x), atol=1e-6)
    assert (tmp_path / "converted" / "diffusion_pytorch_model.safetensors").is_file()


def test_pic2word_layout_with_ddp_prefix(tmp_path):
    reference = _perturbed(Pic2WordProjection(6, 20, 10, n_layer=2)).eval()
    checkpoint = {
        "epoch": 3,
        "state_dict": {"module.visual.proj": torch.zeros(2)},  # the CLIP weights, not part of the projection
        "state_dict_img2text": {f"module.{k}": v for k, v in reference.state_dict().items()},
    }
    torch.save(checkpoint, tmp_path / "pic2word.pt")
    phi = convert_lincir_phi_checkpoint(tmp_path / "pic2word.pt")
    assert (phi.config.activation, phi.config.dropout, phi.config.hidden_dim) == ("relu", 0.1, 20)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(phi(x).pseudo_tokens, reference(x), atol=1e-6)


def test_bare_state_dicts_are_recognised():
    phi_like = _perturbed(lincir_sequential(6, 20, 10))
    state_dict, layout = load_original_phi_checkpoint({f"layers.{k}": v for k, v in phi_like.state_dict().items()})
    assert layout == "phi" and len(state_dict) == 6
    _, layout = load_original_phi_checkpoint(Pic2WordProjection(6, 20, 10, 2).state_dict())
    assert layout == "pic2word"
    ours = TextualInversionProjection(6, 20, 10)
    converted = convert_lincir_phi_checkpoint(ours.state_dict(), dropout=0.2)
    assert converted.config.dropout == 0.2
    for key, value in ours.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value)


def test_conversion_errors_say_what_is_wrong(tmp_path):
    good = {f"layers.{k}": v for k, v in lincir_sequential(6, 20, 10).state_dict().items()}
    with pytest.raises(LinCIRConversionError, match=r"Keys not part of a 'phi' projection.*layers\.9\.extra"):
        convert_lincir_phi_checkpoint({"Phi": {**good, "layers.9.extra": torch.zeros(1)}})
    broken = dict(good)
    broken["layers.3.weight"] = torch.zeros(20, 7)
    with pytest.raises(LinCIRConversionError, match="do not chain"):
        convert_lincir_phi_checkpoint({"Phi": broken})
    no_bias = {k: v for k, v in good.items() if k != "layers.0.bias"}
    with pytest.raises(LinCIRConversionError, match="needs a weight and a bias"):
        convert_lincir_phi_checkpoint({"Phi": no_bias})
    with pytest.raises(LinCIRConversionError, match="Unrecognised checkpoint"):
        convert_lincir_phi_checkpoint({"model": {"a": 1}})
    with pytest.raises(FileNotFoundError, match="is not a file"):
        convert_lincir_phi_checkpoint(tmp_path / "missing.pt")


def test_unreadable_checkpoint_files_are_named(tmp_path):
    for name in ("phi.pt", "phi.safetensors"):
        (tmp_path / name).write_bytes(b"truncated")
        with pytest.raises(LinCIRConversionError, match=name):
            convert_lincir_phi_checkpoint(tmp_path / name)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(LinCIRConversionError, match=r"list\.pt.*list"):
        convert_lincir_phi_checkpoint(tmp_path / "list.pt")


# ------------------------------------------------------------------------------------------- the script


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_lincir_to_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_error(argv, capsys) -> str:
    """The script's one-line error (after `diffusers-cir convert lincir: error: `); it must exit with status 2."""
    capsys.readouterr()
    assert _load_script().main(argv) == 2
    output = capsys.readouterr().err
    error = output.strip().splitlines()[-1]  # progress bars of the loading may come first
    prefix = "diffusers-cir convert lincir: error: "
    assert error.startswith(prefix) and "Traceback" not in output, output
    return error[len(prefix):]


def _tiny_clip_folder(folder: Path) -> Path:
    """A CLIP checkpoint folder in the pipeline layout: the fixture's text tower + a tiny vision tower."""
    shutil.copytree(LINCIR_TINY / "text_encoder", folder / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=20, patch_size=10, projection_dim=24)
    )
    vision.save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}).save_pretrained(folder / "image_processor")
    return folder


def test_script_converts_the_projection_alone(tmp_path, capsys):
    assert _load_script().main(["--checkpoint_path", str(LINCIR_TINY / "phi_original.pt"), "--output_dir", str(tmp_path / "phi")]) == 0
    assert "phi: 24 -> 96 x2 -> 32" in capsys.readouterr().out
    phi = TextualInversionProjection.from_pretrained(tmp_path / "phi")
    io = load_file(str(LINCIR_TINY / "io.safetensors"))
    with torch.no_grad():
        assert (phi(io["image_embeds"]).pseudo_tokens - io["pseudo_tokens"]).abs().max() <= 1e-5


def test_script_builds_a_whole_pipeline(tmp_path):
    clip = _tiny_clip_folder(tmp_path / "clip")
    output = tmp_path / "pipeline"
    _load_script().main(
        ["--checkpoint_path", str(LINCIR_TINY / "phi_original.pt"), "--clip_model_name_or_path", str(clip), "--output_dir", str(output)]
    )
    pipe = LinCIRPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection) and pipe.image_processor is not None
    io = load_file(str(LINCIR_TINY / "io.safetensors"))
    out = pipe(image_embeds=io["image_embeds"], prompt_input_ids=io["input_ids"])
    assert (out.image_embeds - io["text_embeds"]).abs().max() <= 1e-5
    assert json.loads((output / "model_index.json").read_text())["prompt_template"] == "a photo of $ that {text}"


def test_build_pipeline_from_a_full_clip_checkpoint(tmp_path):
    """A transformers `CLIPModel` folder (openai/clip-vit-large-patch14 layout): both towers are read from it."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=20, patch_size=10),
        projection_dim=24,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip")
    build_offline_clip_tokenizer().save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}).save_pretrained(tmp_path / "clip")
    phi = TextualInversionProjection(24, 96, 32)
    pipe = build_lincir_pipeline(phi, tmp_path / "clip")
    ids = pipe.tokenizer(["a photo of a dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected)
        assert torch.allclose(pipe.text_encoder(input_ids=ids).text_embeds, expected, atol=1e-5)
        pixels = torch.randn(1, 3, 20, 20)
        expected_image = clip.get_image_features(pixel_values=pixels)
        expected_image = getattr(expected_image, "pooler_output", expected_image)
        assert torch.allclose(pipe.encode_image(pixels), expected_image, atol=1e-5)
    with pytest.raises(LinCIRConversionError, match="pair the checkpoint with the CLIP model"):
        build_lincir_pipeline(TextualInversionProjection(16, 64, 32), tmp_path / "clip")


def test_text_tower_of_the_fixture_is_a_clip_text_model():
    model = CLIPTextModelWithProjection.from_pretrained(str(LINCIR_TINY / "text_encoder"))
    assert (model.config.hidden_size, model.config.projection_dim) == (32, 24)


def test_a_text_tower_without_projection_is_refused(tmp_path):
    """transformers would re-initialise a missing `text_projection` silently; the loader refuses instead."""
    from transformers import CLIPTextModel

    from diffusers_cir.conversion.lincir import load_clip_text_encoder

    CLIPTextModel.from_pretrained(str(LINCIR_TINY / "text_encoder")).save_pretrained(tmp_path / "text_only")
    with pytest.raises(LinCIRConversionError, match="text_projection"):
        load_clip_text_encoder(tmp_path / "text_only")


@pytest.mark.parametrize(
    "layout, drop",
    [("phi", "layers.3."), ("phi", "layers.0."), ("pic2word", "layers.1.0."), ("diffusers", "hidden_layers.0.")],
)
def test_a_missing_hidden_layer_is_refused_not_skipped(layout, drop):
    if layout == "phi":
        state, wrap = {f"layers.{k}": v for k, v in lincir_sequential(6, 20, 10, num_hidden=2).state_dict().items()}, "Phi"
    elif layout == "pic2word":
        state, wrap = Pic2WordProjection(6, 20, 10, n_layer=3).state_dict(), "state_dict_img2text"
    else:
        state, wrap = TextualInversionProjection(input_dim=6, hidden_dim=20, output_dim=10, num_hidden_layers=3).state_dict(), None
    convert_lincir_phi_checkpoint({wrap: state} if wrap else state)  # complete: converts
    broken = {key: value for key, value in state.items() if not key.startswith(drop)}
    with pytest.raises(LinCIRConversionError, match="a layer is missing"):
        convert_lincir_phi_checkpoint({wrap: broken} if wrap else broken)


def test_converting_the_projection_over_an_earlier_pipeline_conversion(tmp_path, capsys):
    """The projection alone over a whole pipeline: refused without --overwrite (before loading anything), and with it
    the folder holds the projection only, not the earlier pipeline's components around it."""
    clip = _tiny_clip_folder(tmp_path / "clip")
    output = tmp_path / "converted"
    phi_file = str(LINCIR_TINY / "phi_original.pt")
    _load_script().main(["--checkpoint_path", phi_file, "--clip_model_name_or_path", str(clip), "--output_dir", str(output)])
    assert (output / "model_index.json").is_file()
    error = _script_error(["--checkpoint_path", str(tmp_path / "missing.pt"), "--output_dir", str(output)], capsys)
    assert re.search("already holds a converted model .*Pass --overwrite", error)
    _load_script().main(["--checkpoint_path", phi_file, "--output_dir", str(output), "--dropout", "0.3", "--overwrite"])
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert TextualInversionProjection.from_pretrained(output).config.dropout == 0.3


def test_library_conversion_refuses_a_non_empty_output_dir_unless_overwrite(tmp_path):
    phi_file = LINCIR_TINY / "phi_original.pt"
    output = tmp_path / "phi"
    convert_lincir_phi_checkpoint(phi_file, output_dir=output)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_lincir_phi_checkpoint(phi_file, output_dir=output, dropout=0.3)
    assert TextualInversionProjection.from_pretrained(output).config.dropout != 0.3
    convert_lincir_phi_checkpoint(phi_file, output_dir=output, dropout=0.3, overwrite=True)
    assert TextualInversionProjection.from_pretrained(output).config.dropout == 0.3


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dropout", "2"], r"--dropout must be in \[0, 1\), got 2.0"),
        (["--dropout", "nan"], r"--dropout must be in \[0, 1\), got nan"),
        (["--activation", "gleu"], r"--activation must be one of gelu, mish, relu, silu, swish, got 'gleu'"),
    ],
)
def test_bad_dropout_or_activation_is_refused_by_flag_before_the_checkpoint_loads(tmp_path, capsys, flags, expected):
    missing = str(tmp_path / "missing.pt")  # would fail to load if the command got that far
    assert re.search(expected, _script_error(["--checkpoint_path", missing, "--output_dir", str(tmp_path / "phi"), *flags], capsys))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(hidden_dim=True), r"`hidden_dim` must be a positive integer, got True"),
        (dict(num_hidden_layers=True), r"`num_hidden_layers` must be an integer >= 1, got True"),
        (dict(dropout=False), r"`dropout` must be a number in \[0, 1\), got False"),
        (dict(dropout="0.1"), r"`dropout` must be a number in \[0, 1\), got '0.1'"),
        (dict(activation="gleu"), r"`activation` must be one of \['gelu', 'mish', 'relu', 'silu', 'swish'\], got 'gleu'"),
    ],
)
def test_projection_config_refuses_bools_strings_and_unknown_activations(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        TextualInversionProjection(input_dim=6, output_dim=10, **kwargs)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--prompt_template", "a $ that {text}"], r"^--prompt-template configures the pipeline built with "
                                                   r"--clip-model-name-or-path; without it only the projection is saved"),
        (["--no_image_encoder", "--tokenizer_name_or_path", "tok"], r"^--tokenizer-name-or-path, --no-image-encoder configure"),
        (["--clip_model_name_or_path", "clip", "--prompt_template", "a photo that {text}"],
         r"--prompt-template 'a photo that \{text\}' has no '\$' \(--placeholder-token\) where the reference image goes"),
        (["--clip_model_name_or_path", "clip", "--prompt_template", "a $ of {text} {x}"],
         r"^--prompt-template: `prompt_template` 'a \$ of \{text\} \{x\}' is filled with str.format"),
        (["--clip_model_name_or_path", "clip", "--placeholder_token", "*"], r"has no '\*' \(--placeholder-token\)"),
    ],
)
def test_pipeline_options_are_checked_before_the_checkpoint_loads(tmp_path, capsys, flags, expected):
    """Pipeline options without --clip_model_name_or_path were ignored (only the projection is saved), and a template
    without the placeholder gave a saved pipeline that refused every query."""
    missing = str(tmp_path / "missing.pt")  # would fail to load if the command got that far
    assert re.search(expected, _script_error(["--checkpoint_path", missing, "--output_dir", str(tmp_path / "out"), *flags], capsys))
    assert not (tmp_path / "out").exists()


def test_a_placeholder_token_the_tokenizer_splits_is_refused_before_the_pipeline_is_saved(tmp_path, capsys):
    clip = _tiny_clip_folder(tmp_path / "clip")
    error = _script_error(["--checkpoint_path", str(LINCIR_TINY / "phi_original.pt"), "--clip_model_name_or_path",
                           str(clip), "--output_dir", str(tmp_path / "out"), "--placeholder_token", "zzqx",
                           "--prompt_template", "a photo of zzqx that {text}"], capsys)
    assert re.search(r"--placeholder-token: `placeholder_token` 'zzqx' must be a single token", error)
    assert not (tmp_path / "out").exists()
