# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""A generation run: shard plan, ranks, resume, lock, progress, card, contact sheet and throughput.

Scale: launch with ``accelerate launch`` (one process per GPU, any number of nodes, one output folder they all see).
The items of every strategy are cut into shards of ``items_per_shard``; accelerate's ``PartialState`` gives each
process a contiguous range of shards (``split_between_processes``) and each process writes its own. The shard set
depends on the sources and the recipe only, and every item's randomness on ``(seed, strategy, item)``, so the dataset
is the same whatever the number of processes.

Resume: run the same command again. Completed shards (file and record present) are skipped; a shard a killed run left
half-written is rewritten from its first item, to the same bytes. The recipe and the source sizes are recorded in
``generation/{split}/`` on the first run; a resume with another recipe is refused (``overwrite=True`` starts again).

The folder's ``filelock`` lock (``diffusers_cir.utils.locks``, shared with ``data write`` and ``data reshard``), held by
the main process for the whole run, refuses a second run writing into the same folder (fcntl locks: on NFS, use a file
system whose locks work across nodes).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data import schema
from ..utils.locks import LOCK_NAME, lock_folder  # noqa: F401 - LOCK_NAME: where the lock is, for callers
from .components import GenerationComponents
from .config import CAPTION_STRATEGIES, GenerationConfig
from .output import (
    ShardFile,
    add_counts,
    candidate_row,
    card_body,
    format_counts,
    generated_features,
    read_json,
    record_path,
    run_dir,
    shard_done,
    write_json,
)
from .stages import caption_chunk, pair_chunk


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` holds items ``[start, stop)`` of ``strategy``."""

    index: int
    strategy: str
    start: int
    stop: int


def plan_shards(sizes: dict[str, int], items_per_shard: int) -> list[ShardPlan]:
    """Shards of every strategy in turn (in ``sizes``' order), ``items_per_shard`` items each (the last one of a
    strategy may hold fewer)."""
    plan: list[ShardPlan] = []
    for strategy, size in sizes.items():
        for start in range(0, size, items_per_shard):
            plan.append(ShardPlan(len(plan), strategy, start, min(start + items_per_shard, size)))
    return plan


@dataclass
class GenerationResult:
    """What a run did."""

    folder: str
    split: str
    rows: int  # rows in the whole split
    counts: dict[str, Any]  # per strategy: per stage and filter (all shards)
    shards_total: int
    shards_written: int  # by this run
    rows_written: int  # by this run
    seconds: float  # this run's generation time (models loaded before)
    num_processes: int
    device_type: str
    card_path: str | None = None
    contact_sheet_path: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def triplets_per_hour_per_process(self) -> float:
        if self.seconds <= 0 or self.num_processes <= 0:
            return 0.0
        return self.rows_written / (self.seconds / 3600) / self.num_processes

    def throughput_line(self) -> str:
        unit = "GPU" if self.device_type == "cuda" else f"{self.device_type.upper()} process"
        plural = "" if self.num_processes == 1 else ("s" if unit == "GPU" else "es")
        return (f"throughput: {self.triplets_per_hour_per_process:,.0f} triplets per hour per {unit} "
                f"({self.rows_written:,} triplets in {self.seconds:,.1f} s on {self.num_processes} {unit}{plural})")

    def format(self) -> str:
        skipped = self.shards_total - self.shards_written
        lines = [f"{self.rows:,} triplets in {self.shards_total} shard(s) of {self.folder}/images ({self.split}); "
                 f"this run wrote {self.shards_written} shard(s), skipped {skipped} done before",
                 format_counts(self.counts), self.throughput_line()]
        if self.contact_sheet_path:
            lines.append(f"contact sheet: {self.contact_sheet_path}")
        return "\n".join(lines)


class _Context:
    """What the stage functions share during a run."""

    def __init__(self, config, components, sources, vocabulary, bars):
        self.config, self.components, self.sources, self.vocabulary, self.bars = (
            config, components, sources, vocabulary, bars)

    def advance(self, stage: str, items: int) -> None:
        if stage in self.bars:
            self.bars[stage].update(items)


# --------------------------------------------------------------------------------------------- set-up
def process_state():
    """accelerate's ``PartialState`` of this process (CPU processes too, as ``AcceleratorState`` reads
    ``ACCELERATE_USE_CPU``)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _acquire_lock(folder: str):
    # The folder lock every writer of a dataset folder takes (data write, reshard, generate): one run at a time.
    return lock_folder(folder, hint="wait for it to finish, or write to another --output")


def _differences(recorded: Any, given: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(given, dict):
        keys = sorted(set(recorded) | set(given))
        return [d for k in keys for d in _differences(recorded.get(k), given.get(k), f"{prefix}{k}.")]
    return [] if recorded == given else [f"{prefix[:-1]} ({recorded!r} before, {given!r} now)"]


def _prepare_folder(folder: str, config: GenerationConfig, sizes: dict[str, int], overwrite: bool) -> None:
    """Start or resume: check (or record) the recipe and the source sizes of this split."""
    directory = run_dir(folder, config.split)
    recorded_path = os.path.join(directory, "config.json")
    shard_glob = os.path.join(folder, schema.IMAGES_CONFIG, f"{config.split}-*.parquet")
    if overwrite:
        for path in glob.glob(shard_glob) + glob.glob(os.path.join(folder, schema.IMAGES_CONFIG,
                                                                   f".{config.split}-*.partial")):
            os.remove(path)
        shutil.rmtree(directory, ignore_errors=True)
    recipe = {"config": config.to_dict(), "source_sizes": sizes}
    if os.path.isfile(recorded_path):
        differences = _differences(read_json(recorded_path), recipe)
        if differences:
            raise ValueError(
                f"{folder} holds a generation run of split {config.split!r} with another recipe (differs in: "
                f"{'; '.join(differences[:6])}). Resume it with the same settings, pass --overwrite to start again, "
                "or write to another --output."
            )
    elif glob.glob(shard_glob):
        raise FileExistsError(
            f"{folder} already holds shards of split {config.split!r} that no generation run recorded: pass "
            "--overwrite to replace them, or write to another --output."
        )
    write_json(recorded_path, recipe)


def open_sources(config: GenerationConfig) -> dict[str, Any]:
    """``{strategy: CaptionSource or PairSource}`` (strategies of one kind share their source)."""
    from .sources import load_captions, load_image_pairs

    sources: dict[str, Any] = {}
    captions = pairs = None
    for strategy in config.strategies:
        if strategy in CAPTION_STRATEGIES:
            captions = captions or load_captions(config.captions, config.caption_column, config.max_items)
            sources[strategy] = captions
        else:
            pairs = pairs or load_image_pairs(config.image_pairs, config.pair_columns, config.max_items)
            sources[strategy] = pairs
    return sources


def _keyword_vocabulary(state, config: GenerationConfig, components: GenerationComponents, folder: str, sources,
                        progress: bool):
    """The run's keyword vocabulary: built once by the main process (or copied from ``keyword.vocabulary``, or read
    from the run folder when resuming), then read by every process."""
    from .keyword_triplets import KeywordVocabulary, build_keyword_vocabulary

    path = os.path.join(run_dir(folder, config.split), "keyword_vocabulary.parquet")
    if state.is_main_process and not os.path.isfile(path) and config.keyword.vocabulary:
        KeywordVocabulary.load(config.keyword.vocabulary).save(path)  # read (and so checked) once, kept with the run
    if state.is_main_process and not os.path.isfile(path):
        captions = sources["keyword"]
        vocabulary = build_keyword_vocabulary(
            (text for start in range(0, len(captions), 10_000) for text in captions.texts(start, start + 10_000)
             if text),
            components.tagger, components.clip_model, components.clip_processor, config.keyword.similarity_band,
            config.keyword.min_term_count, config.keyword.max_candidates, config.keyword.text_batch_size,
            progress=progress,
        )
        vocabulary.save(path)
    state.wait_for_everyone()
    return KeywordVocabulary.load(path)


# --------------------------------------------------------------------------------------------- shards
def _write_shard(context: _Context, shard: ShardPlan, total: int, folder: str, features, callback) -> dict:
    config = context.config
    started = time.perf_counter()
    writer = ShardFile(folder, config.split, shard.index, total, features)
    counts: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    try:
        for start in range(shard.start, shard.stop, config.chunk_size):
            stop = min(start + config.chunk_size, shard.stop)
            chunk = (caption_chunk if shard.strategy in CAPTION_STRATEGIES else pair_chunk)(
                context, shard.strategy, start, stop)
            write_started = time.perf_counter()
            writer.write([candidate_row(c, config.image_format) for c in chunk.kept])
            chunk.seconds["write"] = time.perf_counter() - write_started
            add_counts(counts, chunk.counts)
            add_counts(seconds, chunk.seconds)
            context.advance("written", stop - start)
            if callback is not None:
                callback("chunk_written", {"shard": shard.index, "rows": writer.num_rows, "stop": stop})
    except BaseException:
        writer.abort()
        raise
    writer.close()
    counts["rows"] = writer.num_rows
    record = {"shard": shard.index, "strategy": shard.strategy, "items": [shard.start, shard.stop],
              "rows": writer.num_rows, "counts": counts, "seconds": seconds,
              "wall_seconds": time.perf_counter() - started}
    write_json(record_path(folder, config.split, shard.index), record)
    if callback is not None:
        callback("shard_done", {"shard": shard.index, "rows": writer.num_rows})
    return record


def _progress_bars(state, todo: list[ShardPlan], config: GenerationConfig, enabled: bool) -> dict[str, Any]:
    """One bar per stage (in items), on the local main process: its own shards' progress."""
    from tqdm.auto import tqdm

    if not enabled or not state.is_local_main_process or not todo:
        return {}
    caption_items = sum(s.stop - s.start for s in todo if s.strategy in CAPTION_STRATEGIES)
    pair_items = sum(s.stop - s.start for s in todo) - caption_items
    totals = {"caption triplets": caption_items, "image pairs": caption_items, "pair texts": pair_items,
              "filters": caption_items + pair_items,
              "masks": caption_items if config.masks.enabled else 0, "written": caption_items + pair_items}
    stages = [stage for stage, total in totals.items() if total]
    return {stage: tqdm(total=totals[stage], desc=f"{stage:>16}", unit="item", position=i, dynamic_ncols=True)
            for i, stage in enumerate(stages)}


# --------------------------------------------------------------------------------------------- finishing
def _finish(config: GenerationConfig, folder: str, plan: list[ShardPlan], features, contact_sheet_rows: int):
    """Aggregate the shard records into counts, and write the card (and the contact sheet)."""
    from huggingface_hub import DatasetCard

    from ..data.card import read_card_infos, update_dataset_card

    counts: dict[str, Any] = {}
    rows = 0
    stage_seconds: dict[str, float] = {}
    for shard in plan:
        record = read_json(record_path(folder, config.split, shard.index))
        add_counts(counts.setdefault(shard.strategy, {}), record["counts"])
        add_counts(stage_seconds, record["seconds"])
        rows += record["rows"]
    sizes = {}
    infos = read_card_infos(folder)
    if schema.IMAGES_CONFIG in infos and infos[schema.IMAGES_CONFIG].splits:
        sizes = {name: info.num_examples for name, info in infos[schema.IMAGES_CONFIG].splits.items()}
    sizes[config.split] = rows
    card_path = os.path.join(folder, "README.md")
    generation = {}
    if os.path.isfile(card_path):
        generation = dict(DatasetCard.load(card_path).data.to_dict().get("generation") or {})
    config_dict = config.to_dict()
    generation[config.split] = {"recipe": config_dict, "counts": counts, "rows": rows}
    update_dataset_card(folder, schema.IMAGES_CONFIG, features, sizes, default=True,
                        body=card_body(config_dict, counts, rows, config.split),
                        pretty_name="Generated composed image retrieval triplets",
                        extra_metadata={"generation": generation})
    sheet = None
    if contact_sheet_rows:
        from .contact_sheet import write_contact_sheet

        sheet = write_contact_sheet(folder, config.split, max_rows=contact_sheet_rows,
                                    path=os.path.join(run_dir(folder, config.split), "contact_sheet.html"))
    return counts, rows, stage_seconds, card_path, sheet


# --------------------------------------------------------------------------------------------- the run
def run_generation(
    config: GenerationConfig,
    components: GenerationComponents,
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    contact_sheet_rows: int = 48,
    callback: Callable[[str, dict], None] | None = None,
) -> GenerationResult:
    """Generate (or resume generating) ``config``'s triplets into ``output_dir``; see the module docstring.

    Every process of an ``accelerate launch`` calls this with the same arguments (and its own components, on its
    device). ``callback(event, info)`` is called after each chunk (``"chunk_written"``) and shard (``"shard_done"``).
    Returns the same :class:`GenerationResult` in every process (counts, card and contact sheet are the main
    process's work).
    """
    from accelerate.utils import broadcast_object_list, gather_object

    config = dataclasses.replace(config, models=dict(config.models or components.names)).check()
    components.check_for(config)
    state = process_state()
    lock, failure = None, [None]
    if state.is_main_process:
        try:
            lock = _acquire_lock(output_dir)
        except FileExistsError as error:
            failure = [error]
    failure = broadcast_object_list(failure)
    if failure[0] is not None:
        raise failure[0]
    try:
        with state.main_process_first():
            sources = open_sources(config)
        sizes = {strategy: len(sources[strategy]) for strategy in config.strategies}
        if state.is_main_process:
            try:
                _prepare_folder(output_dir, config, sizes, overwrite)
            except (ValueError, FileExistsError) as error:
                failure = [error]
        failure = broadcast_object_list(failure)
        if failure[0] is not None:
            raise failure[0]
        plan = plan_shards(sizes, config.items_per_shard)
        if not plan:
            raise ValueError(f"The sources hold no items ({sizes}): nothing to generate.")
        vocabulary = None
        if "keyword" in config.strategies:
            vocabulary = _keyword_vocabulary(state, config, components, output_dir, sources, progress)
        features = generated_features()
        with state.split_between_processes(plan) as mine:
            todo = [s for s in mine if not shard_done(output_dir, config.split, s.index, len(plan))]
        bars = _progress_bars(state, todo, config, progress)
        context = _Context(config, components, sources, vocabulary, bars)
        started = time.perf_counter()
        written = [_write_shard(context, shard, len(plan), output_dir, features, callback) for shard in todo]
        elapsed = time.perf_counter() - started
        for bar in bars.values():
            bar.close()
        totals = gather_object([(len(written), sum(r["rows"] for r in written), elapsed)])
        state.wait_for_everyone()
        outcome = [None]
        if state.is_main_process:
            outcome = [_finish(config, output_dir, plan, features, contact_sheet_rows)]
        counts, rows, stage_seconds, card_path, sheet = broadcast_object_list(outcome)[0]
    finally:
        if lock is not None:
            lock.release()
    return GenerationResult(
        folder=output_dir, split=config.split, rows=rows, counts=counts, shards_total=len(plan),
        shards_written=sum(t[0] for t in totals), rows_written=sum(t[1] for t in totals),
        seconds=max(t[2] for t in totals), num_processes=state.num_processes, device_type=state.device.type,
        card_path=card_path, contact_sheet_path=sheet, stage_seconds=stage_seconds,
    )
