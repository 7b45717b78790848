"""Every number of every golden metric fixture, reproduced through ``diffusers_cir.metrics``.

Fixtures: ``tests/fixtures/metrics/*.json`` (copied from ``../shared/reference/metrics``: outputs of the
official CIRR / FashionIQ / CIRCO / GeneCIS code on synthetic inputs, see SCHEMA.md there), plus every metric
fixture file found in the folders of ``DIFFUSERS_CIR_EXTRA_FIXTURES`` (colon-separated; a folder's direct
subfolders are searched too, and files of other layouts are skipped by their schema).
Tolerances (SCHEMA.md): percentages ``abs <= 1e-4``, fractions ``abs <= 1e-6``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from diffusers_cir import metrics

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "metrics"
METRIC_FAMILIES = ("cirr_recall", "fashioniq_recall", "circo_map", "circo_map_edgecases", "genecis_recall")
PERCENT_TOLERANCE = 1e-4
FRACTION_TOLERANCE = 1e-6


def _metric_family(path: Path) -> str | None:
    """The ``metric_family`` of a metric fixture file, ``None`` for any other JSON (other fixture layouts)."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return None
    if '"metric_family"' not in head or '"schema_version"' not in head:
        return None
    data = load_fixture(str(path))
    if not isinstance(data, dict) or data.get("metric_family") not in METRIC_FAMILIES or "schema_version" not in data:
        return None
    return data["metric_family"]


def discover_metric_fixtures() -> list[Path]:
    """Metric fixture files of ``tests/fixtures/metrics`` and of the folders in ``DIFFUSERS_CIR_EXTRA_FIXTURES``."""
    folders = [FIXTURE_DIR]
    for entry in os.environ.get("DIFFUSERS_CIR_EXTRA_FIXTURES", "").split(":"):
        root = Path(entry.strip()) if entry.strip() else None
        if root is not None and root.is_dir():
            folders.append(root)
            folders.extend(sorted(path for path in root.iterdir() if path.is_dir()))
    found, seen = [], set()
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            if path.resolve() not in seen and _metric_family(path) is not None:
                seen.add(path.resolve())
                found.append(path)
    return found


@functools.lru_cache(maxsize=None)
def load_fixture(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def fixtures_of(family: str) -> list:
    paths = [path for path in discover_metric_fixtures() if _metric_family(path) == family]
    return [pytest.param(str(path), id=f"{path.parent.name}/{path.name}") for path in paths]


def assert_close(actual: float, expected: float, tolerance: float, what: str) -> None:
    assert abs(actual - expected) <= tolerance, f"{what}: got {actual!r}, official {expected!r} (tolerance {tolerance})"


def assert_all_close(got: dict, expected: dict, tolerance: float, what: str = "") -> None:
    """Every expected value (keyed by this package's metric names) reproduced within ``tolerance``."""
    for name, value in expected.items():
        assert_close(got[name], value, tolerance, f"{what}{name}")


def rankings_from_scores(scores: list, gallery_ids: list, depth: int | None = None) -> list:
    """Each query's gallery ids by descending score (ties in gallery order), the first ``depth`` of them."""
    gallery = np.asarray(gallery_ids)
    return [gallery[np.argsort(-np.asarray(row), kind="stable")][:depth].tolist() for row in scores]


# The official outputs of each fixture family, under this package's metric names (shared with
# test_evaluate_modules.py, so the library and the evaluate modules are held to the same numbers).


def official_cirr_metrics(data: dict) -> dict:
    """CLIP4Cir / SEARLE / LinCIR ``recall_at{K}``, ``recall_subset_at{K}`` and ``avg`` (percent)."""
    official = data["official_outputs"]["clip4cir_searle_lincir"]
    expected = {name.replace("cirr_recall_at", "recall_at").replace("cirr_group_recall_at", "recall_subset_at"): value
                for name, value in official["metrics"].items()}
    expected["avg"] = official["derived"]["avg_recall_at5_and_recall_subset_at1"]
    # The CompoDiff paper's Avg(R@1, Rs@1): the official code has no such column, so it is derived here from the
    # official R@1 and R_subset@1.
    expected["avg_r1_rs1"] = (expected["recall_at1"] + expected["recall_subset_at1"]) / 2
    return expected


def official_fashioniq_metrics(data: dict) -> dict:
    """``{category}_recall_at{K}`` and the averages over categories (percent)."""
    official = data["official_outputs"]
    expected = {f"{category}_{name.replace('fiq_', '')}": value
                for category, values in official["per_category"].items() for name, value in values.items()}
    expected.update(official["averages"])
    return expected


def official_circo_server_metrics(data: dict) -> dict:
    """The CIRCO server's ``map_at{K}``, target-only ``recall_at{K}`` and ``semantic_map_at10_{aspect}`` (fractions)."""
    server = data["official_outputs"]["circo_server_evaluation"]
    expected = {f"map_at{k}": value for k, value in server["map_at_k"].items()}
    expected.update({f"recall_at{k}": value for k, value in server["recall_at_k_target_only"].items()})
    expected.update({f"semantic_map_at10_{aspect}": value for aspect, value in server["semantic_map_at10"].items()})
    return expected


def official_circo_validation_metrics(data: dict) -> dict:
    """SEARLE / LinCIR validation ``map_at{K}`` and ``recall_at{K}`` on the full score matrix (percent)."""
    official = data["official_outputs"]["searle_lincir_validation"]["metrics"]
    return {name.replace("circo_", ""): value for name, value in official.items()}


def assert_circo_case_matches(got: dict, case: dict) -> None:
    """One CIRCO edge case: ``map_at{K}`` (NaN where the official AP is NaN) and target-only ``recall_at{K}``."""
    expected = case["official_output"]
    for k, value in expected["map_at_k"].items():
        if expected["map_is_nan"]:
            assert math.isnan(got[f"map_at{k}"]), f"{case['name']} map_at{k}"
        else:
            assert_close(got[f"map_at{k}"], value, FRACTION_TOLERANCE, f"{case['name']} map_at{k}")
    for k, value in expected["recall_at_k_target_only"].items():
        assert_close(got[f"recall_at{k}"], value, FRACTION_TOLERANCE, f"{case['name']} recall_at{k}")


def official_genecis_metrics(data: dict) -> dict:
    """``{task}_recall_at{K}`` and the ``average_*`` over tasks (fractions)."""
    official = data["official_outputs"]
    expected = {f"{task}_{name}": value for task, values in official["per_task"].items() for name, value in values.items()}
    expected.update({name: value for name, value in official["derived"].items() if name.startswith("average_")})
    return expected


def test_the_bundled_fixtures_are_all_discovered():
    families = {_metric_family(path) for path in discover_metric_fixtures()}
    assert set(METRIC_FAMILIES) <= families


def test_extra_fixture_folders_are_searched_and_other_layouts_skipped(tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    (extra / "nested").mkdir(parents=True)
    source = FIXTURE_DIR / "circo_map_edgecases.json"
    (extra / "nested" / "copy.json").write_text(source.read_text())
    (extra / "parity.json").write_text(json.dumps({"schema_version": "1.0", "kind": "compodiff_parity"}))
    (extra / "notes.json").write_text("[1, 2, 3]")
    monkeypatch.setenv("DIFFUSERS_CIR_EXTRA_FIXTURES", f"{tmp_path / 'missing'}:{extra}")
    found = discover_metric_fixtures()
    assert extra / "nested" / "copy.json" in found
    assert extra / "parity.json" not in found and extra / "notes.json" not in found


# ---------------------------------------------------------------------------------------------------- CIRR


def _cirr_inputs(data: dict) -> dict:
    inputs = data["inputs"]
    queries = inputs["queries"]
    return {
        "target_ids": [query["target_id"] for query in queries],
        "reference_ids": [query["reference_id"] for query in queries],
        "group_members": [query["group_members"] for query in queries],
    }


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_from_scores_matches_official(path):
    data = load_fixture(path)
    got = metrics.compute_cirr_metrics(
        **_cirr_inputs(data), scores=data["inputs"]["scores"], gallery_ids=data["inputs"]["gallery_ids"]
    )
    expected = official_cirr_metrics(data)
    assert set(got) == set(expected)
    assert_all_close(got, expected, PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_per_query_matches_official(path):
    data = load_fixture(path)
    hits = metrics.cirr_per_query(
        **_cirr_inputs(data), scores=data["inputs"]["scores"], gallery_ids=data["inputs"]["gallery_ids"]
    )
    for name, values in hits.items():
        official = [row[name] for row in data["per_query_official"]["values"]]
        assert values.astype(float).tolist() == official, name


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_from_ranked_lists_matches_official(path):
    data = load_fixture(path)
    inputs = _cirr_inputs(data)
    rankings = rankings_from_scores(data["inputs"]["scores"], data["inputs"]["gallery_ids"])
    # Full rankings, and top-51 lists (what an index returns for R@50 after deleting the reference) with
    # the subset ranked separately, as a test-server submission holds it.
    full = metrics.compute_cirr_metrics(**inputs, ranked_ids=rankings)
    subset_lists = [row["ranked_subset_ids"] for row in data["generator_bookkeeping"]["per_query"]]
    top51 = metrics.compute_cirr_metrics(
        target_ids=inputs["target_ids"], reference_ids=inputs["reference_ids"],
        ranked_ids=[ranking[:51] for ranking in rankings], ranked_subset_ids=[ids[:3] for ids in subset_lists],
    )
    for got in (full, top51):
        assert_all_close(got, official_cirr_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirplant_soft_recall_matches_official(path):
    data = load_fixture(path)
    inputs = data["inputs"]
    queries = inputs["queries"]
    common = dict(
        reference_ids=[query["reference_id"] for query in queries],
        group_members=[query["group_members"] for query in queries],
        scores=inputs["scores"],
        gallery_ids=inputs["gallery_ids"],
        scale="fraction",
    )
    variants = {
        "cirplant": [query["target_soft"] for query in queries],
        "cirplant_with_target_soft_replaced_by_target_id": [{query["target_id"]: 1.0} for query in queries],
    }
    for variant, target_soft in variants.items():
        got = metrics.cirplant_soft_recall(target_soft=target_soft, **common)
        for name, value in data["official_outputs"][variant]["metrics"].items():
            k = name.split("top")[1].split("_")[0]
            key = f"soft_recall_subset_at{k}" if "inset" in name else f"soft_recall_at{k}"
            assert_close(got[key], value, FRACTION_TOLERANCE, f"{variant}/{key}")


# ----------------------------------------------------------------------------------------------- FashionIQ


@pytest.mark.parametrize("path", fixtures_of("fashioniq_recall"))
def test_fashioniq_matches_official(path):
    data = load_fixture(path)
    from_scores, from_rankings = {}, {}
    for category, inputs in data["inputs"]["categories"].items():
        targets = [query["target"] for query in inputs["queries"]]
        from_scores[category] = {"target_ids": targets, "scores": inputs["scores"], "gallery_ids": inputs["gallery_ids"]}
        from_rankings[category] = {"target_ids": targets,
                                   "ranked_ids": rankings_from_scores(inputs["scores"], inputs["gallery_ids"], depth=50)}
        hits = metrics.fashioniq_per_query(**from_scores[category])
        for name, values in hits.items():
            assert values.astype(float).tolist() == [row[name] for row in data["per_query_official"]["values"][category]]
    for got in (metrics.compute_fashioniq_metrics(from_scores), metrics.compute_fashioniq_metrics(from_rankings)):
        assert_all_close(got, official_fashioniq_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("fashioniq_recall"))
def test_fashioniq_caption_joining_matches_official(path):
    from diffusers_cir.data.benchmarks import join_fashioniq_captions

    data = load_fixture(path)
    for category, inputs in data["inputs"]["categories"].items():
        expected_rows = data["official_outputs"]["caption_joining"][category]
        for query, expected in zip(inputs["queries"], expected_rows, strict=True):
            assert join_fashioniq_captions(query["captions"], style="clip4cir") == [expected["clip4cir"]]
            assert join_fashioniq_captions(query["captions"], style="searle", template="a photo of $ that {}") == [
                expected["searle_lincir_forward"],
                expected["searle_lincir_reversed"],
            ]


# ------------------------------------------------------------------------------------------------- CIRCO


def _circo_queries(data: dict) -> dict:
    queries = data["inputs"]["queries"]
    return {
        "ground_truth_ids": [query["gt_img_ids"] for query in queries],
        "semantic_aspects": [query["semantic_aspects"] for query in queries],
        "query_ids": [query["id"] for query in queries],
    }


@pytest.mark.parametrize("path", fixtures_of("circo_map"))
def test_circo_server_evaluation_matches_official(path):
    data = load_fixture(path)
    submission = data["inputs"]["submission_top50"]
    queries = _circo_queries(data)
    ranked = [submission[str(query_id)] for query_id in queries["query_ids"]]
    got = metrics.compute_circo_metrics(**queries, ranked_ids=ranked, scale="fraction")
    assert_all_close(got, official_circo_server_metrics(data), FRACTION_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("circo_map"))
def test_circo_from_scores_matches_searle_validation(path):
    data = load_fixture(path)
    queries = _circo_queries(data)
    got = metrics.compute_circo_metrics(
        ground_truth_ids=queries["ground_truth_ids"], scores=data["inputs"]["scores"],
        gallery_ids=data["inputs"]["gallery_ids"],
    )
    assert_all_close(got, official_circo_validation_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("circo_map"))
def test_circo_per_query_matches_official(path):
    data = load_fixture(path)
    queries = _circo_queries(data)
    submission = data["inputs"]["submission_top50"]
    per_query = metrics.circo_per_query(
        ground_truth_ids=queries["ground_truth_ids"],
        ranked_ids=[submission[str(query_id)] for query_id in queries["query_ids"]],
    )
    for row, official in enumerate(data["per_query_official"]["values"]):
        for name, value in official.items():
            assert_close(float(per_query[name][row]), value, FRACTION_TOLERANCE, f"query {row} {name}")


@pytest.mark.parametrize("path", fixtures_of("circo_map_edgecases"))
def test_circo_edge_cases_match_official(path):
    data = load_fixture(path)
    assert data["cases"], "edge-case file without cases"
    for case in data["cases"]:
        annotation, expected = case["annotation"], case["official_output"]
        kwargs = dict(ground_truth_ids=[annotation["gt_img_ids"]], ranked_ids=[case["predictions"]],
                      target_ids=[annotation["target_img_id"]], query_ids=[annotation["id"]], scale="fraction")
        if "raises" in expected:
            assert expected["raises"] == "ValueError"
            with pytest.raises(ValueError, match=r"Query 0 has duplicate predictions"):
                metrics.compute_circo_metrics(**kwargs)
            continue
        if expected["map_is_nan"]:
            with pytest.raises(ValueError, match="no ground truth"):
                metrics.compute_circo_metrics(**kwargs)
            kwargs["on_empty_ground_truth"] = "nan"
        got = metrics.compute_circo_metrics(**kwargs)
        assert_circo_case_matches(got, case)
        for k, value in (case.get("hand_computed_expected_map_at_k") or {}).items():
            assert_close(got[f"map_at{k}"], value, FRACTION_TOLERANCE, f"{case['name']} hand map_at{k}")


# ----------------------------------------------------------------------------------------------- GeneCIS


@pytest.mark.parametrize("path", fixtures_of("genecis_recall"))
def test_genecis_matches_official(path):
    data = load_fixture(path)
    per_task = {}
    for task, templates in data["inputs"]["tasks"].items():
        scores = [template["candidate_scores"] for template in templates]
        per_task[task] = metrics.genecis_recall_at_k(scores, scale="fraction")
        hits = metrics.genecis_per_query(scores)
        for name, values in hits.items():
            assert values.astype(float).tolist() == [row[name] for row in data["per_query_official"]["values"][task]]
    got = metrics.genecis_average_over_tasks(per_task)
    assert_all_close(got, official_genecis_metrics(data), FRACTION_TOLERANCE)
