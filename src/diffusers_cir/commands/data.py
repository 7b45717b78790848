"""``diffusers-cir data``: build, re-shard, validate and inspect triplet datasets.

    diffusers-cir data write triplets.jsonl my_dataset --map reference_image=src --map modification_text=edit
    diffusers-cir data write my_folder/ my_dataset --split validation --rows-per-shard 2000
    diffusers-cir data reshard my_dataset --config images --num-shards 64 --shuffle-seed 0
    diffusers-cir data validate my_dataset
    diffusers-cir data inspect webdataset --data-files "/data/SynthTriplets18M/*.tar"
    diffusers-cir data synthetic synthetic_world --train 100000

``write`` reads a JSONL/CSV/TSV file or a folder (see ``diffusers_cir.data.sources.read_triplet_records``) and
writes Parquet shards with the image bytes plus the dataset card. ``validate`` exits with status 1 when it
finds a problem, so it can gate a pipeline.
"""

from __future__ import annotations

import json
import sys

from . import non_negative_int, positive_int


def _parse_mapping(pairs: list[str] | None) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--map expects CANONICAL=COLUMN (e.g. reference_image=src.jpg), got {pair!r}.")
        key, value = pair.split("=", 1)
        mapping[key.strip()] = value.strip()
    return mapping


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="Write, re-shard, validate and inspect triplet datasets.")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    write = actions.add_parser("write", help="Write triplets (folder / JSONL / CSV) into Parquet shards + card.")
    write.add_argument("source", help="A .jsonl/.csv/.tsv file, or a folder (metadata.jsonl, or one sub-folder per triplet).")
    write.add_argument("output", help="Dataset folder to write (shards go to OUTPUT/images/).")
    write.add_argument("--split", default="train", help="Split name. Default: train.")
    write.add_argument(
        "--map", action="append", metavar="CANONICAL=COLUMN",
        help="Column mapping, repeatable: reference_image, target_image, modification_text, reference_caption, "
        "target_caption, id -> your column (dotted paths reach into nested JSON fields).",
    )
    write.add_argument("--rows-per-shard", type=positive_int, default=1000, help="Rows per Parquet file. Default: 1000.")
    write.add_argument(
        "--row-group-size", type=positive_int, default=100, help="Rows per Parquet row group. Default: 100.")
    write.add_argument("--no-verify-images", action="store_true", help="Do not decode images before writing them.")
    write.add_argument("--overwrite", action="store_true", help="Replace existing shards of this split.")
    write.set_defaults(func=run_write)

    reshard = actions.add_parser("reshard", help="Rewrite a split into N shards (or shards of N rows).")
    reshard.add_argument("folder", help="Dataset folder.")
    reshard.add_argument("--config", default="images", help="Configuration (images / embeddings). Default: images.")
    reshard.add_argument("--split", default="train", help="Split. Default: train.")
    size = reshard.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-shards", type=positive_int, help="Number of shards (>= world_size x num_workers).")
    size.add_argument("--rows-per-shard", type=positive_int, help="Rows per shard.")
    reshard.add_argument("--output", default=None, help="Write to another folder (default: in place).")
    reshard.add_argument(
        "--shuffle-seed", type=non_negative_int, default=None, help="Shuffle row groups and rows with this seed.")
    reshard.add_argument(
        "--row-group-size", type=positive_int, default=100, help="Rows per Parquet row group. Default: 100.")
    reshard.set_defaults(func=run_reshard)

    validate = actions.add_parser("validate", help="Check schema, decodability, duplicates and counts.")
    validate.add_argument("folder", help="Dataset folder with a README.md card.")
    validate.add_argument("--config", action="append", help="Only these configurations (repeatable).")
    validate.add_argument("--no-images", action="store_true", help="Skip decoding every image (faster).")
    validate.add_argument("--json", action="store_true", help="Print the report as JSON.")
    validate.set_defaults(func=run_validate)

    inspect = actions.add_parser("inspect", help="Print a dataset's columns and first rows (to write a --map).")
    inspect.add_argument("path", help="load_dataset path: a folder, 'webdataset', 'parquet', a Hub id...")
    inspect.add_argument("--name", default=None, help="Configuration name.")
    inspect.add_argument("--split", default="train", help="Split. Default: train.")
    inspect.add_argument("--data-files", default=None, help="Glob of data files (for 'webdataset', 'parquet'...).")
    inspect.add_argument(
        "--rows", type=non_negative_int, default=1, help="Rows to print (0: only the columns). Default: 1.")
    inspect.set_defaults(func=run_inspect)

    synthetic = actions.add_parser("synthetic", help="Write the synthetic CIR world in the embeddings layout.")
    synthetic.add_argument("output", help="Dataset folder to write.")
    synthetic.add_argument("--seed", type=non_negative_int, default=0, help="World seed. Default: 0.")
    synthetic.add_argument("--tiny", action="store_true", help="The 96-item test world instead of the 2,400-item one.")
    synthetic.add_argument(
        "--train", type=positive_int, default=None, help="Training triplets to sample (default: every single edit).")
    synthetic.add_argument(
        "--rows-per-shard", type=positive_int, default=10000, help="Rows per Parquet file. Default: 10000.")
    synthetic.add_argument("--overwrite", action="store_true", help="Replace existing shards.")
    synthetic.set_defaults(func=run_synthetic)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_write(args) -> int:
    from diffusers_cir.data.schema import MissingColumnsError
    from diffusers_cir.data.shards import write_triplets

    try:
        summary = write_triplets(
            args.source,
            args.output,
            split=args.split,
            column_mapping=_parse_mapping(args.map),
            rows_per_shard=args.rows_per_shard,
            row_group_size=args.row_group_size,
            verify_images=not args.no_verify_images,
            overwrite=args.overwrite,
        )
    except MissingColumnsError as error:  # the usual first-run mistake: the message names --map
        raise ValueError(f"{error} On the command line, name your columns with --map CANONICAL=COLUMN "
                         "(e.g. --map reference_image=src --map modification_text=edit.text).") from None
    print(summary.format())
    if summary.skipped:
        report = f"{args.output}/skipped-{args.split}.jsonl"
        with open(report, "w", encoding="utf-8") as handle:
            for record in summary.skipped:
                handle.write(json.dumps({"source": record.source, "reason": record.reason}) + "\n")
        print(f"the skipped records and their reasons are listed in {report}")
    return 0 if summary.num_rows else 1


def run_reshard(args) -> int:
    from diffusers_cir.data.shards import reshard

    files = reshard(
        args.folder,
        args.config,
        args.split,
        rows_per_shard=args.rows_per_shard,
        num_shards=args.num_shards,
        output_folder=args.output,
        row_group_size=args.row_group_size,
        shuffle_seed=args.shuffle_seed,
    )
    print(f"wrote {len(files)} shard(s) of {args.config}/{args.split} to {args.output or args.folder}")
    return 0


def run_validate(args) -> int:
    from diffusers_cir.data.text_triplets import validate_text_triplets

    # validate_dataset's checks, plus the text-triplet rule on the configurations of that layout
    report = validate_text_triplets(args.folder, configs=args.config, check_images=not args.no_images)
    if args.json:
        print(json.dumps({"ok": report.ok, "counts": report.counts, "problems": report.problems, "warnings": report.warnings}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1


def _describe(value, depth: int = 0):
    if isinstance(value, dict):
        return {key: _describe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        if len(value) > 8:
            return f"<list of {len(value)}: {_describe(value[:3], depth + 1)}...>"
        return [_describe(item, depth + 1) for item in value]
    if hasattr(value, "size") and hasattr(value, "mode"):  # PIL image
        return f"<image {value.size[0]}x{value.size[1]} {value.mode}>"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value


def run_inspect(args) -> int:
    import datasets

    data_files = {args.split: args.data_files} if args.data_files else None
    dataset = datasets.load_dataset(args.path, args.name, split=args.split, data_files=data_files, streaming=True)
    for column, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    print(f"columns ({dataset.num_shards} shard(s)):")
    for column, feature in (dataset.features or {}).items():
        print(f"  {column}: {feature}")
    for index, row in enumerate(dataset.take(args.rows)):
        print(f"row {index}:")
        print(json.dumps(_describe(row), indent=2, default=str))
    return 0


def run_synthetic(args) -> int:
    from diffusers_cir.data.synthetic import SPLITS, SyntheticCIRWorld, SyntheticWorldConfig

    config = SyntheticWorldConfig.tiny(seed=args.seed) if args.tiny else SyntheticWorldConfig(seed=args.seed)
    world = SyntheticCIRWorld(config)
    counts = {split: None for split in SPLITS}
    counts["train"] = args.train
    written = world.write_embeddings_dataset(args.output, counts, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)
    print(f"{world}\nwrote {written} triplets and a {world.num_items}-item gallery to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from diffusers_cir.cli import main

    sys.exit(main(["data", *sys.argv[1:]]))
