"""Behaviour of ``diffusers_cir.metrics`` beyond the golden fixtures: both input forms, ids, ties, errors, traps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_cir import metrics
from diffusers_cir.metrics import NOT_RETRIEVED, ranks_from_ranked_lists, ranks_from_scores

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "metrics"


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _brute_force_cirr(scores, gallery, references, targets, members, ks, subset_ks):
    """CIRR straight from the definition: stable descending sort, delete the reference, filter to members."""
    hits = {f"recall_at{k}": [] for k in ks} | {f"recall_subset_at{k}": [] for k in subset_ks}
    for row, reference, target, group in zip(scores, references, targets, members):
        ranked = [gallery[j] for j in np.argsort(-np.asarray(row), kind="stable") if gallery[j] != reference]
        subset = [image for image in ranked if image in group]
        for k in ks:
            hits[f"recall_at{k}"].append(ranked.index(target) < k)
        for k in subset_ks:
            hits[f"recall_subset_at{k}"].append(subset.index(target) < k)
    return {name: 100 * float(np.mean(values)) for name, values in hits.items()}


def test_ties_are_broken_by_gallery_position():
    scores = np.array([[0.5, 0.5, 0.5, 0.9]])
    assert ranks_from_scores(scores, [2]).ranks.tolist() == [3]
    assert ranks_from_scores(scores, [0]).ranks.tolist() == [1]
    assert ranks_from_scores(scores, [2], exclude_indices=[0]).ranks.tolist() == [2]
    assert ranks_from_scores(scores, [2], exclude_indices=[2]).ranks.tolist() == [NOT_RETRIEVED]


@pytest.mark.parametrize("seed", [0, 1])
def test_cirr_score_and_list_paths_equal_a_brute_force_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_gallery = 40, 60
    gallery = [f"img{i}" for i in range(num_gallery)]
    # Few distinct values: many ties, which both paths must order the same way (by gallery position).
    scores = rng.integers(0, 8, size=(num_queries, num_gallery)).astype(np.float32)
    references, targets, members = [], [], []
    for _ in range(num_queries):
        group = rng.choice(num_gallery, size=6, replace=False)
        references.append(gallery[group[0]])
        targets.append(gallery[group[1]])
        members.append([gallery[i] for i in rng.permutation(group)])
    expected = _brute_force_cirr(scores, gallery, references, targets, members, (1, 5, 10, 50), (1, 2, 3))
    common = dict(target_ids=targets, reference_ids=references, group_members=members)
    from_scores = metrics.compute_cirr_metrics(**common, scores=torch.from_numpy(scores), gallery_ids=gallery)
    rankings = [[gallery[j] for j in np.argsort(-row, kind="stable")] for row in scores]
    from_lists = metrics.compute_cirr_metrics(**common, ranked_ids=rankings)
    expected["avg"] = (expected["recall_at5"] + expected["recall_subset_at1"]) / 2
    expected["avg_r1_rs1"] = (expected["recall_at1"] + expected["recall_subset_at1"]) / 2
    assert from_scores == pytest.approx(expected, abs=1e-9)
    assert from_lists == pytest.approx(expected, abs=1e-9)


def test_int_and_string_ids_and_array_inputs_give_the_same_result():
    data = _load("cirr_recall_seed0.json")
    gallery = data["inputs"]["gallery_ids"]
    as_int = {image: index + 1000 for index, image in enumerate(gallery)}
    queries = data["inputs"]["queries"][:50]
    scores = np.asarray(data["inputs"]["scores"][:50], dtype=np.float32)
    kwargs = lambda convert: dict(  # noqa: E731
        target_ids=[convert(q["target_id"]) for q in queries],
        reference_ids=[convert(q["reference_id"]) for q in queries],
        group_members=[[convert(m) for m in q["group_members"]] for q in queries],
    )
    by_string = metrics.compute_cirr_metrics(**kwargs(str), scores=scores, gallery_ids=gallery)
    by_int = metrics.compute_cirr_metrics(**kwargs(as_int.get), scores=scores, gallery_ids=np.array([as_int[g] for g in gallery]))
    full_ranking = torch.argsort(torch.from_numpy(scores), dim=1, descending=True, stable=True) + 1000
    int_kwargs = kwargs(as_int.get)
    by_tensor = metrics.compute_cirr_metrics(
        target_ids=torch.tensor(int_kwargs["target_ids"]), reference_ids=np.array(int_kwargs["reference_ids"]),
        ranked_ids=full_ranking, group_members=torch.tensor(int_kwargs["group_members"]),
    )
    assert by_string == by_int == by_tensor


def test_digit_strings_match_int_ids_like_the_circo_server():
    got = metrics.compute_circo_metrics(ground_truth_ids=[[101, 102]], ranked_ids=[["5000", "101", "102"]], ks=(5,))
    assert got["map_at5"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_truncated_lists_raise_only_when_the_answer_is_unknown():
    ranked = [["a", "t", "b"], ["a", "b", "c"]]
    # Query 0 finds its target within the list: fine at any K. Query 1 does not, and K=5 > 3 listed ids.
    assert metrics.recall_at_k(target_ids=["t", "t"], ranked_ids=ranked, ks=(3,)) == {"recall_at3": 50.0}
    with pytest.raises(ValueError, match=r"Recall@5 is undetermined for 1 queries \(first: row 1\)"):
        metrics.recall_at_k(target_ids=["t", "t"], ranked_ids=ranked, ks=(5,))
    # Deleting a listed reference shortens the known ranking by one.
    with pytest.raises(ValueError, match="Recall@3"):
        metrics.recall_at_k(target_ids=["x"], ranked_ids=[["r", "a", "b"]], exclude_ids=["r"], ks=(3,))


def test_cirr_subset_from_truncated_lists_needs_the_members_or_a_decisive_list():
    # The target sits third in the global list; two of its subset's other members are listed above it.
    ranked = [["r", "m1", "x", "m2", "t"]]
    members = [["r", "t", "m1", "m2", "m3", "m4"]]
    got = metrics.compute_cirr_metrics(target_ids=["t"], reference_ids=["r"], ranked_ids=ranked, group_members=members,
                                       recall_ks=(4,), subset_ks=(1, 2, 3))
    assert got == {"recall_at4": 100.0, "recall_subset_at1": 0.0, "recall_subset_at2": 0.0, "recall_subset_at3": 100.0}
    with pytest.raises(ValueError, match="Recall@3 is undetermined"):
        metrics.compute_cirr_metrics(target_ids=["t"], reference_ids=["r"], ranked_ids=[["r", "m1", "x"]],
                                     group_members=members, recall_ks=(1,), subset_ks=(3,))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target_ids=["zz"]), "target id 'zz' of query 0 is not in `gallery_ids`"),
        (dict(reference_ids=["zz"]), "reference id 'zz' of query 0 is not in `gallery_ids`"),
        (dict(reference_ids=["t"]), "Query 0 has its reference as target"),
        (dict(group_members=[["r", "a", "b"]]), "target 't' of query 0 is not among its `group_members`"),
        (dict(group_members=None), "CIRR Recall_subset needs `group_members`"),
        (dict(gallery_ids=["r", "t", "a", "a"]), "`gallery_ids` must be unique"),
        (dict(gallery_ids=["r", "t", "a"]), "`gallery_ids` has 3 ids but `scores` has 4 columns"),
        (dict(scores=[[0.1, float("nan"), 0.3, 0.4]]), "row 0 contains NaN"),
        (dict(scores=[0.1, 0.2, 0.3, 0.4]), "must be a 2-D"),
        (dict(target_ids=["t", "t"]), "`scores` has 1 rows but 2 target ids"),
        (dict(gallery_ids=None), "`scores` needs `gallery_ids`"),
        (dict(scale="percentage"), '`scale` must be "percent" or "fraction"'),
        (dict(recall_ks=(0, 5)), "positive cutoffs"),
    ],
)
def test_cirr_errors_name_the_problem(change, message):
    kwargs = dict(target_ids=["t"], reference_ids=["r"], scores=[[0.1, 0.2, 0.3, 0.4]],
                  gallery_ids=["r", "t", "a", "b"], group_members=[["r", "t", "a"]])
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        metrics.compute_cirr_metrics(**kwargs)


def test_duplicate_ids_in_a_ranked_list_are_rejected():
    with pytest.raises(ValueError, match=r"`ranked_ids\[1\]` lists id 'b' more than once"):
        ranks_from_ranked_lists([["a", "b"], ["b", "c", "b"]], ["a", "c"])
    # Padding of shorter rows is not mistaken for a duplicate.
    assert ranks_from_ranked_lists([[0, 5], [0]], [5, 0]).ranks.tolist() == [1, 0]


def test_scale_fraction_is_percent_over_100():
    kwargs = dict(target_ids=[1, 2, 3], scores=np.eye(3)[[0, 2, 2]], gallery_ids=[1, 2, 3], ks=(1, 2))
    percent, fraction = metrics.recall_at_k(**kwargs), metrics.recall_at_k(**kwargs, scale="fraction")
    assert {k: v / 100 for k, v in percent.items()} == pytest.approx(fraction)
    # Row 1 ranks its target third: item 2 scores higher and item 0 ties with it at a lower position.
    assert fraction == {"recall_at1": pytest.approx(2 / 3), "recall_at2": pytest.approx(2 / 3)}


def test_the_traps_give_the_documented_wrong_numbers():
    """Deleting or keeping the reference is what separates the official numbers from the common mistakes."""
    cirr = _load("cirr_recall_seed0.json")
    queries = cirr["inputs"]["queries"]
    naive = metrics.recall_at_k(target_ids=[q["target_id"] for q in queries], ks=(1, 5, 10, 50),
                                scores=cirr["inputs"]["scores"], gallery_ids=cirr["inputs"]["gallery_ids"])
    for k in (1, 5, 10, 50):
        wrong = cirr["generator_bookkeeping"]["naive_without_reference_removal_percent"][f"recall_at{k}"]
        assert naive[f"recall_at{k}"] == pytest.approx(wrong, abs=1e-4)
        official = cirr["official_outputs"]["clip4cir_searle_lincir"]["metrics"][f"cirr_recall_at{k}"]
        assert naive[f"recall_at{k}"] != pytest.approx(official, abs=1e-4) or k == 50

    fiq = _load("fashioniq_recall_seed0.json")
    for category, inputs in fiq["inputs"]["categories"].items():
        removed = metrics.recall_at_k(
            target_ids=[q["target"] for q in inputs["queries"]], exclude_ids=[q["candidate"] for q in inputs["queries"]],
            scores=inputs["scores"], gallery_ids=inputs["gallery_ids"], ks=(10, 50))
        for name, value in fiq["generator_bookkeeping"]["wrong_if_reference_removed_percent"][category].items():
            assert removed[name] == pytest.approx(value, abs=1e-4)

    circo = _load("circo_map_seed0.json")
    gallery = np.asarray(circo["inputs"]["gallery_ids"])
    filtered = []
    for query, row in zip(circo["inputs"]["queries"], circo["inputs"]["scores"]):
        ranking = gallery[np.argsort(-np.asarray(row), kind="stable")]
        filtered.append(ranking[ranking != query["reference_img_id"]][:50].tolist())
    got = metrics.compute_circo_metrics(ground_truth_ids=[q["gt_img_ids"] for q in circo["inputs"]["queries"]],
                                        ranked_ids=filtered, scale="fraction")
    variants = circo["generator_bookkeeping"]["non_official_variants_fraction"]
    for k in (5, 10, 25, 50):
        assert got[f"map_at{k}"] == pytest.approx(variants[f"reference_removed_before_top50_at{k}"], abs=1e-6)


def test_circo_normalises_by_min_of_ground_truths_and_k():
    # 8 ground truths, 5 of them in the top-5: AP@5 = 1 and AP@10 = 5/8 (DEFINITIONS.md 3.1).
    ranked = [[1, 2, 3, 4, 5] + list(range(100, 145))]
    per_query = metrics.circo_per_query(ground_truth_ids=[list(range(1, 9))], ranked_ids=ranked, ks=(5, 10))
    assert per_query["ap_at5"].tolist() == [1.0]
    assert per_query["ap_at10"].tolist() == [5 / 8]


def test_circo_from_scores_equals_from_its_top50_and_rejects_bad_annotations():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 200))
    gallery = list(range(500, 700))
    ground_truths = [rng.choice(gallery, size=rng.integers(1, 15), replace=False).tolist() for _ in range(30)]
    top50 = [[gallery[j] for j in np.argsort(-row)[:50]] for row in scores]
    assert metrics.compute_circo_metrics(ground_truth_ids=ground_truths, scores=scores, gallery_ids=gallery) == \
        pytest.approx(metrics.compute_circo_metrics(ground_truth_ids=ground_truths, ranked_ids=top50), abs=1e-12)
    with pytest.raises(ValueError, match="lists a ground-truth id more than once"):
        metrics.compute_circo_metrics(ground_truth_ids=[[1, 1]], ranked_ids=[[1, 2]])
    with pytest.raises(ValueError, match="unknown aspects"):
        metrics.compute_circo_metrics(ground_truth_ids=[[1]], ranked_ids=[[1, 2]], semantic_aspects=[["colour"]])


def test_genecis_ragged_galleries_and_ties_favour_the_target():
    scores = [[0.5, 0.9, 0.5], [0.7, 0.1]]
    assert metrics.genecis_per_query(scores, ks=(1, 2))["recall_at2"].tolist() == [True, True]
    assert metrics.genecis_per_query([[0.4, 0.4, 0.1]], ks=(1,))["recall_at1"].tolist() == [True]
    assert metrics.genecis_recall_at_k(scores, target_indices=[1, 1], ks=(1,)) == {"recall_at1": 50.0}
    with pytest.raises(ValueError, match="non-finite"):
        metrics.genecis_per_query([[0.1, float("inf")], [0.2]])


def test_fashioniq_averages_weight_categories_equally():
    got = metrics.compute_fashioniq_metrics({
        "dress": {"target_ids": ["a"] * 3, "ranked_ids": [["a"], ["b"], ["b"]]},
        "shirt": {"target_ids": ["a"], "ranked_ids": [["a"]]},
    }, ks=(1,))
    # Pooled queries would give 50%; per-category means give (33.3 + 100) / 2.
    assert got["average_recall_at1"] == pytest.approx((100 / 3 + 100) / 2)


@pytest.mark.parametrize("module", ["ids", "ranking", "recall", "cirr", "fashioniq", "circo", "genecis"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"diffusers_cir.metrics.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_cirr_reports_both_published_avgs_labelled_with_their_sources():
    # Two queries: the first target at rank 1 globally, the second at rank 3 globally (2 in its subset).
    result = metrics.compute_cirr_metrics(
        target_ids=["t1", "t2"], reference_ids=["r1", "r2"],
        ranked_ids=[["t1", "a", "b", "c", "d", "e"], ["x", "y", "t2", "z", "w", "v"]],
        group_members=[["r1", "t1", "a"], ["r2", "t2", "x"]], recall_ks=(1, 5), subset_ks=(1,))
    assert result["recall_at1"] == 50.0 and result["recall_at5"] == 100.0 and result["recall_subset_at1"] == 50.0
    assert result["avg"] == 75.0  # CLIP4Cir: (R@5 + Rs@1) / 2
    assert result["avg_r1_rs1"] == 50.0  # the CompoDiff paper: (R@1 + Rs@1) / 2
    assert metrics.cirr_avg_r1_rs1(18.24, 27.51) == pytest.approx(22.875)  # the paper's CompoDiff row, 22.88
    assert set(metrics.CIRR_AVG_DEFINITIONS) == {"avg", "avg_r1_rs1"}
    assert "CLIP4Cir" in metrics.CIRR_AVG_DEFINITIONS["avg"] and "CompoDiff" in metrics.CIRR_AVG_DEFINITIONS["avg_r1_rs1"]
    # without K=5 the CLIP4Cir Avg cannot be formed, the paper's still can
    only_r1 = metrics.compute_cirr_metrics(
        target_ids=["t1"], reference_ids=["r1"], ranked_ids=[["t1", "a"]], group_members=[["r1", "t1", "a"]],
        recall_ks=(1,), subset_ks=(1,))
    assert "avg" not in only_r1 and only_r1["avg_r1_rs1"] == 100.0
