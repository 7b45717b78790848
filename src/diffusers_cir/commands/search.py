"""``diffusers-cir search``: composed image retrieval from the command line.

    diffusers-cir search --index photos-index --model models/compodiff --image dog.jpg --text "as a pencil sketch"
    diffusers-cir search --index photos-index --model models/compodiff --image room.jpg --text "a red sofa" \\
        --mask sofa_mask.png --negative-prompt "leather" --k 30 --html results.html

Prints the ranked results (rank, score, id, path); with ``--html PAGE`` also writes an HTML page with the reference
and the result thumbnails. The reference image itself is left out of the results when it is part of the gallery (say so with
``--keep-reference`` to keep it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("search", help="Search a gallery index with a reference image and a text.")
    parser.add_argument("--index", required=True, help="Index folder (from `diffusers-cir index build`).")
    parser.add_argument("--model", default=None, help="CIR pipeline folder (default: the model the index was built with).")
    parser.add_argument("--image", default=None, help="Reference image (omit for a text-only query).")
    parser.add_argument("--text", "--prompt", dest="text", required=True, help='Modification text, e.g. "as a pencil sketch".')
    parser.add_argument("--negative-prompt", "--negative-text", dest="negative_text", default=None,
                        help="What the results should not have.")
    parser.add_argument(
        "--mask", default=None, help="Mask image: the region of the reference to change (white); needs --image.")
    parser.add_argument("--k", type=positive_int, default=20, help="Number of results. Default: 20.")
    parser.add_argument(
        "--num-inference-steps", "--steps", dest="steps", type=positive_int, default=None,
        help="Sampler steps of a sampling pipeline. Default: its own (10).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pipeline's sampler. Default: 0.")
    parser.add_argument(
        "--html", default=None,
        help="Also write an HTML page (the query and the result thumbnails) to this file. Default: no page.")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results as JSON here.")
    parser.add_argument("--keep-reference", action="store_true", help="Do not leave the reference image out.")
    parser.add_argument("--exclude-id", action="append", default=[], help="Gallery id to leave out (repeatable).")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available).")
    parser.add_argument(
        "--no-verify-checksums", action="store_true",
        help="Load the index without hashing its files against their checksums (sizes are still checked): for a "
        "huge on-disk index, where verifying reads every byte once (about 1 s per 3 GB when cached).")
    parser.set_defaults(func=run_search)


def _check_image_file(flag: str, path: str) -> None:
    from diffusers_cir import load_image

    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r}: there is no file there.")
    try:
        load_image(path, name=flag)
    except ValueError as error:  # load_image's message names the argument; say it with the flag, and why
        raise ValueError(f"{flag} {path!r} could not be read as an image: {error.__cause__ or error}") from error


def _exclude_ids(given: list[str], index_ids) -> list:
    """The --exclude-id values as index ids; an id the index does not hold (a typo) would exclude nothing."""
    import numpy as np

    if index_ids.dtype.kind == "i":
        not_integers = [item for item in given if not item.strip().lstrip("-").isdigit()]
        if not_integers:
            raise ValueError(f"--exclude-id {not_integers[0]!r}: the ids of this index are integers.")
        given = [int(item) for item in given]
    unknown = [item for item, known in zip(given, np.isin(np.asarray(given), index_ids)) if not known]
    if unknown:
        raise ValueError(
            f"--exclude-id {', '.join(repr(item) for item in unknown)}: not an id of this index (its ids look like "
            f"{', '.join(repr(item) for item in index_ids[:3].tolist())})."
        )
    return given


# Query options: flag -> the pipeline argument it becomes.
SEARCH_CALL_FLAGS = {
    "--num-inference-steps": "num_inference_steps", "--negative-prompt": "negative_prompt", "--mask": "mask_image"
}


def run_search(args: argparse.Namespace) -> int:
    import torch

    from diffusers_cir.retrieval import GalleryIndex, check_pipeline_options, composed_search, load_pipeline

    # Everything the command line names is checked before the pipeline loads (a missing image failed after it).
    if args.mask is not None and args.image is None:
        raise ValueError("--mask marks the region of the reference image to change: give the reference with --image.")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None:
            _check_image_file(flag, path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    index = GalleryIndex.load(args.index, verify_checksums=not args.no_verify_checksums)
    model = args.model or index.model
    if model is None:
        print("--model is required: the index does not record the model it was built with.", file=sys.stderr)
        return 2
    exclude_ids = _exclude_ids(args.exclude_id, index.ids)
    given = {"--num-inference-steps": args.steps, "--negative-prompt": args.negative_text, "--mask": args.mask}
    check_pipeline_options(model, {flag: SEARCH_CALL_FLAGS[flag] for flag, value in given.items() if value is not None})
    pipeline = load_pipeline(model, device=device)
    result = composed_search(
        pipeline,
        index,
        image=args.image,
        text=args.text,
        negative_text=args.negative_text,
        mask=args.mask,
        k=args.k,
        exclude_reference=not args.keep_reference,
        exclude_ids=exclude_ids,
        num_inference_steps=args.steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if result.excluded_ids:
        print(f"Left out of the results: {', '.join(str(item) for item in result.excluded_ids)}")
    print(result.format_table())
    if args.html:
        print(f"Wrote {result.save_html(args.html)}")
    if args.json_path:
        json_path = Path(args.json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)  # as save_html does for --html
        records = [
            {"rank": hit.rank, "id": hit.id, "score": hit.score, "metadata": hit.metadata} for hit in result.hits
        ]
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"text": args.text, "image": args.image, "results": records}, handle, indent=2)
    return 0
