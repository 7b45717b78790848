"""``diffusers-cir index``: embed a gallery and build a searchable index.

    diffusers-cir index build --images photos/ --model models/compodiff --output photos-index
    diffusers-cir index build --list gallery.txt --model models/compodiff --output idx --factory IVF4096,PQ64 --nprobe 32
    diffusers-cir index build --dataset data/my_images --split test --id-column id --model ... --output ...
    accelerate launch -m diffusers_cir.cli index build ...      # one GPU per process
    diffusers-cir index info photos-index

Embeddings are written to ``OUTPUT/embeddings`` in resumable parts: run the same command again after an
interruption and finished parts are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from ..utils.locks import folder_lock
from . import non_negative_int, positive_int

# What `check_index_options` calls its arguments here.
INDEX_FLAGS = {"factory": "--factory", "train_size": "--train-size", "shard_size": "--shard-size", "ondisk": "--ondisk",
               "nprobe": "--nprobe", "efSearch": "--ef-search"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="Embed a gallery of images and build a searchable index.")
    actions = parser.add_subparsers(dest="index_command", metavar="ACTION")

    build = actions.add_parser("build", help="Embed a gallery (resumable) and build its index.")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images (searched recursively).")
    source.add_argument("--list", dest="list_file", help="List file: one PATH or ID<TAB>PATH per line.")
    source.add_argument("--dataset", help="A datasets dataset: a save_to_disk folder or a load_dataset path.")
    # Defaults applied in run_build: given without --dataset, these would be ignored, so they are refused.
    build.add_argument("--split", default=None, help="Dataset split (with --dataset). Default: train.")
    build.add_argument("--image-column", default=None, help="Dataset image column (with --dataset). Default: image.")
    build.add_argument("--id-column", default=None, help="Dataset id column (with --dataset; default: row numbers).")
    build.add_argument("--model", required=True, help="CIR pipeline folder (or CLIP vision model folder).")
    build.add_argument("--output", required=True, help="Index folder to write.")
    build.add_argument("--factory", default="Flat", help="faiss index-factory string. Default: Flat (exact).")
    build.add_argument(
        "--train-size", type=positive_int, default=None,
        help="Training sample for IVF/PQ (default: 64 x nlist, at least 16384).",
    )
    build.add_argument(
        "--nprobe", type=positive_int, default=None, help="IVF lists visited per query (saved with the index).")
    build.add_argument("--ef-search", type=positive_int, default=None, help="HNSW efSearch (saved with the index).")
    build.add_argument("--ondisk", action="store_true", help="Keep IVF inverted lists on disk (larger than memory).")
    build.add_argument(
        "--shard-size", type=positive_int, default=None, help="Split a Flat/HNSW index into parts of N vectors.")
    build.add_argument("--batch-size", type=positive_int, default=64, help="Images per encoder call. Default: 64.")
    build.add_argument(
        "--part-size", type=positive_int, default=4096, help="Images per resumable part. Default: 4096.")
    build.add_argument("--num-workers", type=non_negative_int, default=2, help="Image-decoding workers. Default: 2.")
    build.add_argument("--device", default=None, help="cpu / cuda (default: accelerate's device).")
    build.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                       help="Precision of the image encoder (default: as saved; float16 needs a GPU for speed).")
    build.add_argument("--fp16", dest="dtype", action="store_const", const="float16", help="Same as --dtype float16.")
    build.add_argument("--no-resume", action="store_true", help="Delete embeddings of an earlier run and start over.")
    build.add_argument("--skip-unreadable", action="store_true", help="Record unreadable images and go on.")
    build.add_argument(
        "--no-verify-checksums", action="store_true",
        help="Do not hash the embedding parts of an earlier run against their checksums (sizes are still checked).")
    build.set_defaults(func=run_build)

    info = actions.add_parser("info", help="Print the manifest of an index folder.")
    info.add_argument("index", help="Index folder.")
    info.set_defaults(func=run_info)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _load_dataset(path: str, split: str):
    import datasets

    folder = Path(path)
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split {split!r} is not in {path} (splits: {list(loaded)}).")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(path, split=split)


def run_build(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from diffusers_cir.retrieval import check_index_options, load_gallery_encoder

    if args.dataset is None:
        given = [flag for flag, value in (("--split", args.split), ("--image-column", args.image_column),
                                          ("--id-column", args.id_column)) if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            source = "--images" if args.images else "--list"
            raise ValueError(f"{', '.join(given)} {verb} to --dataset only; the gallery here comes from {source}.")
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.num_processes > 1:
        device = accelerator.device  # `accelerate launch`: one device per process
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        accelerator = None
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    encoder = load_gallery_encoder(args.model, device=device, torch_dtype=dtype)
    # The index options are checked for the model's embedding width now, not after the gallery has been embedded.
    check_index_options(
        encoder.embedding_dim, args.factory, train_size=args.train_size, shard_size=args.shard_size,
        ondisk=args.ondisk, nprobe=args.nprobe, efSearch=args.ef_search, names=INDEX_FLAGS,
    )
    if args.images:
        source = args.images
    elif args.list_file:
        source = args.list_file
    else:
        source = _load_dataset(args.dataset, args.split or "train")
    # A second build into the same --output is refused here, before it embeds anything.
    is_main = accelerator is None or accelerator.is_main_process
    with folder_lock(args.output, hint="wait for it to finish, or pass another --output") if is_main else nullcontext():
        return _embed_and_index(args, encoder, source, accelerator)


def _embed_and_index(args: argparse.Namespace, encoder, source, accelerator) -> int:
    from diffusers_cir.retrieval import build_index_from_embedding_files, encode_gallery

    output = Path(args.output)
    gallery = encode_gallery(
        encoder,
        source,
        output / "embeddings",
        # Recorded in the index, where `diffusers-cir search` finds its default --model: a relative folder
        # would only resolve from the directory the index was built in.
        model_name=str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model),
        batch_size=args.batch_size,
        part_size=args.part_size,
        num_workers=args.num_workers,
        resume=not args.no_resume,
        skip_unreadable=args.skip_unreadable,
        image_column=args.image_column or "image",
        id_column=args.id_column,
        accelerator=accelerator,
        verify_checksums=not args.no_verify_checksums,
    )
    if accelerator is not None and not accelerator.is_main_process:
        return 0
    skipped = gallery.skipped()
    if skipped:
        print(f"Skipped {len(skipped)} unreadable images (listed in {output / 'embeddings' / 'parts'}):", file=sys.stderr)
        for record in skipped[:10]:
            print(f"  {record.get('path') or record.get('row')}: {record['error']}", file=sys.stderr)
    index = build_index_from_embedding_files(
        gallery,
        output,
        factory=args.factory,
        train_size=args.train_size,
        shard_size=args.shard_size,
        ondisk=args.ondisk,
        nprobe=args.nprobe,
        efSearch=args.ef_search,
    )
    print(f"Indexed {index.ntotal} images ({index.factory}, width {index.embedding_dim}) into {output}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from diffusers_cir.retrieval import read_manifest

    print(json.dumps(read_manifest(args.index), indent=2))
    return 0
