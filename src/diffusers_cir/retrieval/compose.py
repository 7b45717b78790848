"""The one compose path: queries (a reference, one or several texts, a negative text, a mask) -> query embeddings,
through the pipeline contract. Evaluation, ``composed_search``, training validation and the demo compose here.

A pipeline whose ``call_parameters()`` include ``image_embeds`` composes from the reference's gallery embedding
(no second pass through the image tower); another one (MagicLens fuses the reference's image tokens with the text)
is given the reference images. A query with several texts (SEARLE / LinCIR FashionIQ: both caption orders) is
``normalize(mean(normalize(compose(reference, text)) for each text))``. Sampling pipelines get one generator per
batch, seeded ``seed + batch number``, on the CPU: the queries do not depend on the global random state, the batch
they were in or the device.

Example:
    >>> import torch
    >>> from diffusers_cir.evaluation import IdHashEncoder
    >>> pipe = IdHashEncoder(embedding_dim=8)
    >>> queries = compose_queries(pipe, [["is red", "red it is"], "has two"], reference_embeds=torch.randn(2, 8))
    >>> tuple(queries.shape), torch.allclose(queries.norm(dim=-1), torch.ones(2))
    ((2, 8), True)
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .index import normalize_embeddings

__all__ = ["compose_queries", "composed_batches"]

# Query parts the caller gives per query, and the pipeline argument each one becomes.
_PER_QUERY = {"negative_prompts": "negative_prompt", "mask_images": "mask_image"}


def _texts(prompts: Sequence[str | Sequence[str]]) -> list[list[str]]:
    texts = [[prompt] if isinstance(prompt, str) else list(prompt) for prompt in prompts]
    empty = [row for row, query in enumerate(texts) if not query]
    if empty:
        raise ValueError(f"`prompts[{empty[0]}]` holds no text: give each query one text or several.")
    return texts


def _check_call(pipeline, accepted: frozenset, per_query: dict, call_kwargs: dict) -> None:
    """Refuse, rather than drop, what the pipeline cannot take."""
    name = type(pipeline).__name__
    for argument, values in per_query.items():
        if values is not None and any(value is not None for value in values) and _PER_QUERY[argument] not in accepted:
            raise ValueError(f"{name} does not take `{_PER_QUERY[argument]}`; leave it out for this pipeline.")
    unknown = sorted(name for name in call_kwargs if name not in accepted)
    if unknown:
        raise ValueError(f"{name} does not accept {unknown}; its arguments are {sorted(accepted)}.")


def _reference_argument(accepted, reference_embeds, reference_images, rows: list[int]) -> dict:
    if reference_embeds is not None and "image_embeds" in accepted:
        return {"image_embeds": reference_embeds[torch.as_tensor(rows)]}
    if reference_images is not None:
        return {"image": [reference_images[row] for row in rows]}
    return {}


@torch.no_grad()
def compose_queries(
    pipeline: Any,
    prompts: Sequence[str | Sequence[str]],
    *,
    reference_embeds: torch.Tensor | None = None,
    reference_images: Sequence | None = None,
    negative_prompts: Sequence[str | None] | None = None,
    mask_images: Sequence | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    show_progress: bool = False,
    **call_kwargs,
) -> torch.Tensor:
    """L2-normalised query embeddings ``[Q, D]`` (float32, CPU), one per entry of ``prompts``.

    Args:
        pipeline: a CIR pipeline (anything meeting the pipeline contract).
        prompts: per query, one text or a list of texts (averaged as described in the module docstring).
        reference_embeds: ``[Q, D]`` gallery embeddings of the references (all-zero rows: text-only queries, for a
            pipeline that takes them), used when the pipeline composes from ``image_embeds``.
        reference_images: ``Q`` reference images (anything the pipeline reads: PIL images, paths, ...), used when
            the pipeline cannot compose from embeddings, or when no embeddings are given. Indexed per batch, so a
            lazy sequence reads only the images of the batch being composed. Neither: text-only queries.
        negative_prompts, mask_images: per query (``None`` entries: none); refused if the pipeline cannot take them.
        batch_size: (query, text) pairs per pipeline call.
        seed: seeds one CPU generator per batch when the pipeline takes a ``generator`` (``None``: no generator, or
            pass ``generator=`` to use your own for every batch).
        call_kwargs: further pipeline arguments (``num_inference_steps``, ``guidance_scale``, ...); refused if the
            pipeline does not take them.
    """
    composed, pair_rows = [], []
    batches = composed_batches(
        pipeline, prompts, reference_embeds=reference_embeds, reference_images=reference_images,
        negative_prompts=negative_prompts, mask_images=mask_images, batch_size=batch_size, seed=seed,
        show_progress=show_progress, **call_kwargs,
    )
    for rows, output in batches:
        embeds = torch.as_tensor(output.image_embeds)
        assert embeds.shape[0] == len(rows), f"{type(pipeline).__name__} returned {tuple(embeds.shape)} for {len(rows)}"
        name = f"the query embeddings {type(pipeline).__name__} composed for queries {rows[0]}-{rows[-1]}"
        composed.append(torch.from_numpy(normalize_embeddings(embeds, name)))
        pair_rows += rows
    if not composed:
        return torch.empty(0, 0)
    summed = torch.zeros(len(prompts), composed[0].shape[1]).index_add_(0, torch.tensor(pair_rows), torch.cat(composed))
    return torch.from_numpy(normalize_embeddings(summed, "the averaged query embeddings"))


@torch.no_grad()
def composed_batches(
    pipeline: Any,
    prompts: Sequence[str | Sequence[str]],
    *,
    reference_embeds: torch.Tensor | None = None,
    reference_images: Sequence | None = None,
    negative_prompts: Sequence[str | None] | None = None,
    mask_images: Sequence | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    show_progress: bool = False,
    **call_kwargs,
) -> Iterator[tuple[list[int], Any]]:
    """The pipeline calls of :func:`compose_queries` (same arguments), one at a time: the query row of each (query,
    text) pair in the call, and the pipeline's output as it came. For what a pipeline gives beyond ``image_embeds``
    (a CaptionRewritePipeline's ``rewrite_embeds``, which LDRE's ensemble weighs over the whole query set)."""
    texts = _texts(prompts)
    accepted = pipeline.call_parameters()
    per_query = {"negative_prompts": negative_prompts, "mask_images": mask_images}
    _check_call(pipeline, accepted, per_query, call_kwargs)
    if reference_images is None and reference_embeds is not None and "image_embeds" not in accepted:
        raise ValueError(
            f"{type(pipeline).__name__} composes from the reference's pixels (it takes no `image_embeds`): pass "
            "`reference_images`."
        )
    for name, values in (("reference_embeds", reference_embeds), ("reference_images", reference_images), *per_query.items()):
        assert values is None or len(values) == len(texts), f"`{name}` has {len(values)} entries for {len(texts)} queries"
    pairs = [(row, text) for row, query in enumerate(texts) for text in query]
    starts = range(0, len(pairs), batch_size)
    for number, start in enumerate(tqdm(starts, desc="Composing queries", unit="batch", disable=not show_progress)):
        rows = [row for row, _ in pairs[start : start + batch_size]]
        arguments = dict(call_kwargs, prompt=[text for _, text in pairs[start : start + batch_size]])
        arguments.update(_reference_argument(accepted, reference_embeds, reference_images, rows))
        for name, values in per_query.items():
            if values is not None and any(values[row] is not None for row in rows):
                arguments[_PER_QUERY[name]] = [values[row] for row in rows]
        if "output_type" in accepted:
            arguments["output_type"] = "pt"
        if "generator" in accepted and "generator" not in call_kwargs and seed is not None:
            arguments["generator"] = torch.Generator().manual_seed(seed + number)
        yield rows, pipeline(**arguments)
