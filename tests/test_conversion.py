import json
import os
import pickle

import pytest
import torch
from conftest import FIXTURES, SHARED

from diffusers_cir import CompoDiffTransformer
from diffusers_cir.conversion import (
    CompoDiffConversionError,
    convert_compodiff_checkpoint,
    convert_compodiff_state_dict,
)

TINY = FIXTURES / "compodiff_tiny" / "original_checkpoint"
MANIFEST_CANDIDATES = [
    FIXTURES / "compodiff_aesthetic_checkpoint_keys.json",
    SHARED / "reference" / "compodiff_aesthetic_checkpoint_keys.json",
]


def _manifest():
    for path in MANIFEST_CANDIDATES:
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip("compodiff_aesthetic_checkpoint_keys.json not found")


def _tiny_state():
    return torch.load(TINY / "pytorch_model.bin", map_location="cpu", weights_only=True)


def test_full_size_manifest_converts_to_the_released_parameter_count():
    manifest = _manifest()
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in manifest.items()}
    shared_rotary = torch.rand(16, generator=generator)  # one module shared by all layers in the reference
    for key in state:
        if key.endswith("rotary_emb.freqs"):
            state[key] = shared_rotary
    # Schedule buffers are not checked against random values here: use the real schedule.
    state.pop("model.noise_scheduler.alphas_cumprod")
    state["model.noise_scheduler.biass"] = torch.zeros(1)  # the misspelled buffer of the published checkpoint
    config, converted = convert_compodiff_state_dict(
        state, {"embed_dim": 768, "model_depth": 12, "model_dim": 64, "model_heads": 16, "timesteps": 1000}
    )
    assert config["embedding_dim"] == 768 and config["num_layers"] == 12 and config["text_embedding_dim"] == 1280
    assert config["num_cross_attention_heads"] == 8 and config["attention_head_dim"] == 64
    with torch.device("meta"):
        model = CompoDiffTransformer(**config)
    assert set(converted) == set(model.state_dict())
    for key, value in converted.items():
        assert tuple(value.shape) == tuple(model.state_dict()[key].shape), key
    model = model.to_empty(device="cpu")
    model.load_state_dict(converted, strict=True)
    assert sum(parameter.numel() for parameter in model.parameters()) == 140_043_792
    # every weight of the manifest landed somewhere: the converted values are the ones we drew
    assert torch.equal(model.blocks[11].ff.proj_out.weight, state["model.net.transformer.layers.11.2.5.weight"])
    assert torch.equal(model.text_proj.bias, state["model.net.to_text_embeds.0.bias"])


def test_every_tiny_weight_is_used():
    state = _tiny_state()
    model = convert_compodiff_checkpoint(str(TINY))
    ours = model.state_dict()
    assert torch.equal(ours["blocks.1.cross_attn.null_kv"], state["model.net.transformer.layers.1.1.null_kv"])
    assert torch.equal(ours["mask_embedding.linear_1.weight"], state["model.net.to_mask_embeds.1.net.0.0.weight"])
    assert torch.equal(ours["rotary_frequencies"], state["model.net.transformer.layers.0.0.rotary_emb.freqs"])
    net_numel = sum(v.numel() for k, v in state.items() if k.startswith("model.net.") and "rotary_emb" not in k)
    rotary = state["model.net.transformer.layers.0.0.rotary_emb.freqs"].numel()
    assert sum(p.numel() for p in model.parameters()) == net_numel + rotary


def test_weights_file_and_misspelled_buffer(tmp_path):
    state = _tiny_state()
    state["model.noise_scheduler.biass"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())
    model = convert_compodiff_checkpoint(str(tmp_path / "pytorch_model.bin"))
    assert model.config.num_layers == 2


def test_unknown_key_is_refused():
    state = _tiny_state()
    state["model.net.something_new.weight"] = torch.zeros(2)
    with pytest.raises(CompoDiffConversionError, match="Unknown keys"):
        convert_compodiff_state_dict(state)


def test_unknown_noise_scheduler_key_is_reported_not_dropped():
    state = _tiny_state()
    state["model.noise_scheduler.biass"] = torch.zeros(1)  # known: dropped
    convert_compodiff_state_dict(state)
    state["model.noise_scheduler.ema_decay"] = torch.zeros(1)  # not a schedule buffer of the releases
    with pytest.raises(CompoDiffConversionError, match="model.noise_scheduler.ema_decay"):
        convert_compodiff_state_dict(state)


def test_incomplete_checkpoint_is_refused(tmp_path):
    state = _tiny_state()
    del state["model.net.transformer.layers.1.2.1.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CompoDiffConversionError, match="incomplete"):
        convert_compodiff_checkpoint(str(tmp_path))


def test_not_a_compodiff_checkpoint(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CompoDiffConversionError, match="model.net"):
        convert_compodiff_checkpoint(str(tmp_path))


def test_config_contradicting_weights(tmp_path):
    torch.save(_tiny_state(), tmp_path / "pytorch_model.bin")
    config = json.loads((TINY / "config.json").read_text())
    config["model_depth"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompoDiffConversionError, match="num_layers"):
        convert_compodiff_checkpoint(str(tmp_path))


def test_other_noise_schedule_is_refused():
    state = _tiny_state()
    state["model.noise_scheduler.alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    with pytest.raises(CompoDiffConversionError, match="schedule"):
        convert_compodiff_state_dict(state)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickle_with_code_is_not_executed(tmp_path):
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.net.x": _Payload()}, handle)
    with pytest.raises(CompoDiffConversionError, match="weights_only"):
        convert_compodiff_checkpoint(str(tmp_path))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CompoDiffConversionError, match="model.safetensors"):
        convert_compodiff_checkpoint(str(tmp_path))
    folder = tmp_path / "bad_config"
    folder.mkdir()
    torch.save(_tiny_state(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{model_depth: 2")
    with pytest.raises(CompoDiffConversionError, match="config.json"):
        convert_compodiff_checkpoint(str(folder))


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        convert_compodiff_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        convert_compodiff_checkpoint(str(tmp_path))


def test_conversion_script_writes_a_loadable_pipeline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from diffusers_cir import CompoDiffPipeline

    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_compodiff_to_diffusers.py"
    output = tmp_path / "pipe"
    result = subprocess.run(
        [sys.executable, str(script), "--checkpoint_path", str(TINY), "--output_path", str(output)],
        capture_output=True, text=True, check=True,
    )
    assert "parameters" in result.stdout
    assert (output / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = CompoDiffPipeline.from_pretrained(output)
    io = load_file(str(FIXTURES / "compodiff_tiny" / "io.safetensors"))
    with torch.no_grad():
        out = pipe.transformer(
            io["denoiser.x_t"], io["denoiser.timesteps"], io["denoiser.image_cond"], io["denoiser.text_cond"], io["denoiser.mask"]
        ).predicted_image_embedding
    assert (out - io["denoiser.out"]).abs().max() <= 1e-5


def test_cli_convert(tmp_path):
    from diffusers_cir.cli import main

    assert main(["convert", "compodiff", "--checkpoint_path", str(TINY), "--output_path", str(tmp_path / "p"), "--dtype", "bf16"]) == 0
    config = json.loads((tmp_path / "p" / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 2 and config["embedding_dim"] == 64


def test_cli_convert_lincir(tmp_path):
    from diffusers_cir import TextualInversionProjection
    from diffusers_cir.cli import main

    phi_file = FIXTURES / "lincir_tiny" / "phi_original.pt"
    assert main(["convert", "lincir", "--checkpoint_path", str(phi_file), "--output_dir", str(tmp_path / "phi")]) == 0
    phi = TextualInversionProjection.from_pretrained(tmp_path / "phi")
    assert phi.config.input_dim == 24 and phi.config.output_dim == 32


# ------------------------------------------------------------------------------------------ output folder
def _other_checkpoint(folder):
    """The tiny checkpoint with other weights: a conversion whose result differs from TINY's."""
    folder.mkdir()
    state = {key: value + 1 if key.startswith("model.net.") else value for key, value in _tiny_state().items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((TINY / "config.json").read_text())
    return folder


def _snapshot(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_converting_over_an_earlier_conversion_is_refused_then_replaced_without_stale_files(tmp_path):
    from diffusers_cir import CompoDiffPipeline
    from diffusers_cir.conversion import convert_compodiff_checkpoint_to_pipeline

    output = tmp_path / "pipe"
    convert_compodiff_checkpoint_to_pipeline(str(TINY), str(output))
    earlier = _snapshot(output)
    other = _other_checkpoint(tmp_path / "other")
    with pytest.raises(FileExistsError, match=r"already holds a converted model .*overwrite=True"):
        convert_compodiff_checkpoint_to_pipeline(str(other), str(output), safe_serialization=False)
    assert _snapshot(output) == earlier

    # .bin this time: a stale .safetensors next to it would be what from_pretrained loads.
    new = convert_compodiff_checkpoint_to_pipeline(str(other), str(output), safe_serialization=False, overwrite=True)
    assert sorted(os.listdir(output / "transformer")) == ["config.json", "diffusion_pytorch_model.bin"]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left behind
    loaded = CompoDiffPipeline.from_pretrained(output)
    reference = convert_compodiff_checkpoint(str(TINY))
    for key, value in new.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key
    assert not torch.equal(loaded.transformer.text_proj.bias, reference.text_proj.bias)


def test_a_folder_that_is_not_a_conversion_is_never_replaced(tmp_path):
    from diffusers_cir.conversion import convert_compodiff_checkpoint_to_pipeline

    output = tmp_path / "my-files"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not empty \(notes.txt\) and is not an earlier conversion"):
            convert_compodiff_checkpoint_to_pipeline(str(TINY), str(output), overwrite=overwrite)
    assert _snapshot(output) == {"notes.txt": b"keep me"}
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        convert_compodiff_checkpoint_to_pipeline(str(TINY), str(tmp_path / "a-file"))
    (tmp_path / "empty").mkdir()  # an empty folder is simply used
    convert_compodiff_checkpoint_to_pipeline(str(TINY), str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "model_index.json").is_file()


def test_a_failed_conversion_leaves_the_earlier_one_as_it_was(tmp_path, monkeypatch):
    from diffusers_cir import CompoDiffPipeline
    from diffusers_cir.conversion import convert_compodiff_checkpoint_to_pipeline

    output = tmp_path / "pipe"
    convert_compodiff_checkpoint_to_pipeline(str(TINY), str(output))
    earlier = _snapshot(output)
    original_save = CompoDiffPipeline.save_pretrained

    def save_then_fail(self, folder, **kwargs):
        original_save(self, folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(CompoDiffPipeline, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert_compodiff_checkpoint_to_pipeline(str(_other_checkpoint(tmp_path / "other")), str(output), overwrite=True)
    assert _snapshot(output) == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other", "pipe"]


def test_cli_convert_refuses_an_earlier_conversion_without_overwrite(tmp_path, capsys):
    from diffusers_cir.cli import main

    output = tmp_path / "p"
    assert main(["convert", "compodiff", "--checkpoint_path", str(TINY), "--output_path", str(output)]) == 0
    argv = ["convert", "compodiff", "--checkpoint_path", str(TINY), "--output_path", str(output), "--dtype", "bf16"]
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("diffusers-cir convert compodiff: error: ") and "Pass --overwrite to replace it" in error
    assert len(error.strip().splitlines()) == 1  # one line, no traceback
    assert main(argv + ["--overwrite"]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(output / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
