"""The authors' CompoDiff model, imported from a checkout the user points at, with the same weights as ours.

Nothing of the authors' code ships with this package. Get it and what it imports (their requirements.txt lists more:
gradio and clip-retrieval are only for their demo; rotary-embedding-torch 0.9.1 is the version our parity fixtures
were made with), for example::

    git clone https://github.com/navervision/CompoDiff /tmp/CompoDiff
    pip install "rotary-embedding-torch==0.9.1" einops einops-exts   # torchvision, transformers: already here
    python benchmarks/bench_compodiff.py --device cpu --reference-code /tmp/CompoDiff

The model is built with their `compodiff.models.build_compodiff` (what `CompoDiffModel` wraps), given random
weights whose gains are perturbed away from 1 (a missing gain shows), and its state dict, under the released
checkpoints' `model.` prefix, goes through this package's converter (`convert_compodiff_state_dict`): the package
runs exactly the weights the authors' code runs.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import torch

from diffusers_cir import CompoDiffTransformer
from diffusers_cir.conversion.compodiff import convert_compodiff_state_dict

# the released checkpoints' config.json fields, and the test-sized variant (the authors' text width is always 1280)
FULL_CONFIG = {"embed_dim": 768, "model_depth": 12, "model_dim": 64, "model_heads": 16, "timesteps": 1000}
TINY_CONFIG = {"embed_dim": 64, "model_depth": 2, "model_dim": 48, "model_heads": 2, "timesteps": 1000}
TEXT_WIDTH = 1280


def import_authors_models(reference_code: str | Path):
    """`compodiff.models` of the checkout at `reference_code` (the folder holding `compodiff/`)."""
    folder = Path(reference_code).resolve()
    if not (folder / "compodiff" / "models.py").is_file():
        raise FileNotFoundError(
            f"--reference-code {str(reference_code)!r} holds no compodiff/models.py: pass the root of a checkout of "
            "https://github.com/navervision/CompoDiff."
        )
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("compodiff.models")
    except ImportError as error:
        raise ImportError(
            f"The authors' code at {folder} needs {error.name!r}: pip install \"rotary-embedding-torch==0.9.1\" "
            "einops einops-exts (see benchmarks/compodiff_authors.py)."
        ) from error
    finally:
        sys.path.remove(str(folder))
    if not str(Path(module.__file__).resolve()).startswith(str(folder)):
        raise ImportError(f"`compodiff.models` was imported from {module.__file__}, not from {folder}.")
    # their sampling loop shows a progress bar per call; the package's is off in the benchmark too
    module.tqdm = functools.partial(module.tqdm, disable=True)
    return module


@torch.no_grad()
def build_pair(reference_code: str | Path, config: dict, seed: int = 0):
    """(authors' `CompoDiff` model, our `CompoDiffTransformer`) with the same random weights, float32 on the CPU."""
    models = import_authors_models(reference_code)
    torch.manual_seed(seed)
    authors = models.build_compodiff(
        config["embed_dim"], config["model_depth"], config["model_dim"], config["model_heads"], config["timesteps"]
    ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for name, parameter in authors.named_parameters():
        if name.endswith(".g") or name.endswith(".bias"):  # gains (init 1) and biases away from their init
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    released = {f"model.{key}": value for key, value in authors.state_dict().items()}
    our_config, state_dict = convert_compodiff_state_dict(released, config)
    package = CompoDiffTransformer(**our_config)
    package.load_state_dict(state_dict, strict=True)
    return authors, package.eval()


def authors_sample(authors, inputs: dict, steps: int, seed: int, guidance_scale: float = 7.5,
                   image_guidance_scale: float = 1.5) -> torch.Tensor:
    """One run of the authors' `CompoDiff.sample` (their DDIM loop, three-way guidance, one sample per query)."""
    batch = inputs["image_embeds"].shape[0]
    negative = inputs["negative_prompt_embeds"].expand(batch, -1, -1)
    mask = inputs.get("mask")
    if mask is None:
        mask = torch.zeros(batch, 64, 64)
    return authors.sample(
        inputs["image_embeds"][:, None], inputs["prompt_embeds"], negative, mask, num_samples_per_batch=1,
        cond_scale=(image_guidance_scale, guidance_scale), timesteps=steps, random_seed=seed,
    )
