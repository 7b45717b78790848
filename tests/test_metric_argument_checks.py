"""Argument checks of diffusers_cir.metrics: bad inputs fail with a message naming the argument, never a wrong number."""

import numpy as np
import pytest

from diffusers_cir.metrics import compute_cirr_metrics, genecis_per_query, genecis_recall_at_k, recall_at_k

SCORES = [[0.9, 0.1, 0.5]]
GALLERY = ["a", "b", "c"]


@pytest.mark.parametrize("ks", ["10", (1.5,), (True,), None])
def test_cutoffs_that_are_not_whole_numbers_are_refused(ks):
    # int() used to turn "10" into the cutoffs (1, 0) and 1.5 into 1 (a Recall@1 reported for a Recall@1.5).
    with pytest.raises(ValueError, match="`ks` must"):
        recall_at_k(target_ids=["c"], ks=ks, scores=SCORES, gallery_ids=GALLERY)


def test_cutoffs_as_arrays_and_integral_floats_still_work():
    expected = recall_at_k(target_ids=["c"], ks=(1, 2), scores=SCORES, gallery_ids=GALLERY)
    assert recall_at_k(target_ids=["c"], ks=np.array([1, 2]), scores=SCORES, gallery_ids=GALLERY) == expected
    assert recall_at_k(target_ids=["c"], ks=[1.0, 2.0], scores=SCORES, gallery_ids=GALLERY) == expected
    assert set(expected) == {"recall_at1", "recall_at2"}
    with pytest.raises(ValueError, match="`recall_ks` must"):
        compute_cirr_metrics(target_ids=["c"], reference_ids=["a"], scores=SCORES, gallery_ids=GALLERY,
                             recall_ks="50", subset_ks=())
    with pytest.raises(ValueError, match="`ks` must"):
        genecis_recall_at_k(SCORES, ks=(0.5,))


@pytest.mark.parametrize("form", ["scores", "ranked"])
def test_a_query_without_a_target_is_refused_not_counted_as_a_miss(form):
    inputs = dict(scores=[[0.9, 0.1, 0.5]] * 2, gallery_ids=GALLERY) if form == "scores" else dict(
        ranked_ids=[["a", "c", "b"]] * 2)
    with pytest.raises(ValueError, match=r"`target_ids` is None for 1 queries \(first: query 1\)"):
        recall_at_k(target_ids=["a", None], ks=(1,), **inputs)
    with pytest.raises(ValueError, match="`target_ids` is None"):
        compute_cirr_metrics(target_ids=[None, "c"], reference_ids=["b", "b"], subset_ks=(), **inputs)
    assert recall_at_k(target_ids=["a", "c"], ks=(1,), **inputs) == {"recall_at1": 50.0}


def test_zero_queries_are_refused_with_a_message_in_both_input_forms():
    # The score-matrix form crashed in a reshape ("cannot reshape array of size 0"); the ranked form returned NaN
    # with numpy's "Mean of empty slice" warning.
    with pytest.raises(ValueError, match="no queries to average"):
        recall_at_k(target_ids=[], ks=(1,), scores=np.zeros((0, 3)), gallery_ids=GALLERY)
    with pytest.raises(ValueError, match="no queries to average"):
        recall_at_k(target_ids=[], ks=(1,), ranked_ids=[])
    from diffusers_cir.metrics import recall_per_query

    per_query = recall_per_query(target_ids=[], ks=(1,), scores=np.zeros((0, 3)), gallery_ids=GALLERY)
    assert per_query["recall_at1"].shape == (0,)


@pytest.mark.parametrize("candidate_scores", [[], np.zeros((0, 3))])
def test_genecis_without_templates_says_what_is_empty(candidate_scores):
    # An empty list of templates with an empty list of targets used to fail with a TypeError about
    # `positive_indices` dtype float64 (np.asarray([]) is float), naming an argument the caller never passed.
    with pytest.raises(ValueError, match="`candidate_scores` holds 0 templates"):
        genecis_recall_at_k(candidate_scores, target_indices=[])
    with pytest.raises(ValueError, match="`candidate_scores` holds 0 templates"):
        genecis_recall_at_k(candidate_scores)
    assert genecis_per_query(candidate_scores, target_indices=[], ks=(1,))["recall_at1"].shape == (0,)


def test_genecis_template_without_candidates_is_refused_not_counted_as_a_hit():
    # The empty row was padded with -inf, so its "target" tied with the padding and ranked first: a hit.
    with pytest.raises(ValueError, match=r"`candidate_scores\[1\]` is empty"):
        genecis_recall_at_k([[0.5, 0.2], []], ks=(1,))
    with pytest.raises(ValueError, match=r"`candidate_scores` has shape \(1, 0\)"):
        genecis_recall_at_k(np.zeros((1, 0)), ks=(1,))


def test_genecis_target_index_into_the_padding_of_a_short_template_is_refused():
    scores = [[0.5, 0.1], [0.2, 0.3, 0.4]]
    # Template 0 has 2 candidates; index 2 pointed at its -inf padding and counted as a Recall@3 hit.
    with pytest.raises(ValueError, match=r"`target_indices\[0\]` is 2 but template 0 has 2 candidates"):
        genecis_per_query(scores, target_indices=[2, 0], ks=(3,))
    assert genecis_per_query(scores, target_indices=[1, 2], ks=(1, 2))["recall_at2"].tolist() == [True, True]


@pytest.mark.parametrize("target_indices, error", [([0.0], TypeError), (True, TypeError), (np.array([True]), TypeError)])
def test_genecis_target_indices_must_be_integers(target_indices, error):
    # Floats were reported as `positive_indices` (an internal name); True was silently read as index 1.
    with pytest.raises(error, match="`target_indices`"):
        genecis_per_query([[0.5, 0.1]], target_indices=target_indices)


@pytest.mark.parametrize(
    "candidate_scores, error, message",
    [
        (np.array([[np.nan, 0.1]]), ValueError, r"`candidate_scores` row 0 contains NaN"),
        (np.array([0.5, 0.1]), ValueError, r"`candidate_scores` must be a 2-D"),
        ([0.5, 0.1], ValueError, r"one list of candidate scores per template; `candidate_scores\[0\]` is 0.5"),
        ([["a", "b"]], TypeError, r"`candidate_scores\[0\]` must be a list of numbers"),
        ("scores", TypeError, r"`candidate_scores` must be a \[num_templates, num_candidates\] array"),
        (None, TypeError, r"`candidate_scores` must be a \[num_templates, num_candidates\] array"),
    ],
)
def test_genecis_bad_candidate_scores_are_named(candidate_scores, error, message):
    with pytest.raises(error, match=message):
        genecis_per_query(candidate_scores)


@pytest.mark.parametrize("form", ["scores", "ranked"])
def test_circo_target_ids_none_or_of_the_wrong_length_are_refused(form):
    from diffusers_cir.metrics import compute_circo_metrics

    ground_truths = [[1, 2], [3]]
    inputs = dict(scores=[[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.9, 0.0]], gallery_ids=[1, 2, 3, 4]) if form == "scores" \
        else dict(ranked_ids=[[1, 2], [3, 4]])
    # A None target used to be scored as a miss (Recall@5 = 50 here instead of an error).
    with pytest.raises(ValueError, match=r"`target_ids` is None for 1 queries with ground truths \(first: query 1\)"):
        compute_circo_metrics(ground_truth_ids=ground_truths, target_ids=[1, None], ks=(5,), **inputs)
    # A query without ground truths has no target (the official zero_gts case): Recall@K counts it as a miss.
    kept = compute_circo_metrics(ground_truth_ids=[[1, 2], []], target_ids=[1, None], ks=(5,),
                                 on_empty_ground_truth="nan", **inputs)
    assert kept["recall_at5"] == 50.0
    # Too many targets were reported as `positive_indices` (scores) or "the positives" (ranked lists).
    with pytest.raises(ValueError, match="`target_ids` has 3 ids but `ground_truth_ids` has 2 queries"):
        compute_circo_metrics(ground_truth_ids=ground_truths, target_ids=[1, 3, 4], ks=(5,), **inputs)
    assert compute_circo_metrics(ground_truth_ids=ground_truths, target_ids=[1, 3], ks=(5,), **inputs)["recall_at5"] == 100.0


def test_circo_ranked_lists_and_ground_truths_of_different_lengths_are_named():
    from diffusers_cir.metrics import compute_circo_metrics

    with pytest.raises(ValueError, match="`ranked_ids` has 2 lists but `ground_truth_ids` has 1; one per query"):
        compute_circo_metrics(ground_truth_ids=[[1, 2]], ranked_ids=[[1, 2], [3]], ks=(5,))


def test_circo_semantic_aspects_given_as_one_string_is_refused():
    from diffusers_cir.metrics import compute_circo_metrics

    # len("addition") == 8 used to be compared with the number of queries.
    with pytest.raises(TypeError, match="`semantic_aspects` must hold one list of aspect names per query"):
        compute_circo_metrics(ground_truth_ids=[[1, 2]], ranked_ids=[[1, 2]], semantic_aspects="addition", ks=(5,))


@pytest.mark.parametrize("form", ["scores", "ranked"])
def test_circo_accepts_arbitrary_string_ids_as_documented(form):
    # The docstring used to say "ints or digit strings": any string id works, as a relabelling of int ids.
    from diffusers_cir.metrics import compute_circo_metrics

    rng = np.random.default_rng(0)
    gallery = np.arange(100, 130)
    scores = rng.normal(size=(6, gallery.size))
    ground_truths = [rng.choice(gallery, size=int(rng.integers(1, 5)), replace=False).tolist() for _ in range(6)]
    targets = [row[-1] for row in ground_truths]
    ranked = [gallery[np.argsort(-row, kind="stable")][:12].tolist() for row in scores]

    def name(ids):
        return [f"img_{i}" for i in ids] if isinstance(ids, list) else f"img_{ids}"

    as_ints = dict(scores=scores, gallery_ids=gallery.tolist()) if form == "scores" else dict(ranked_ids=ranked)
    as_strings = dict(scores=scores, gallery_ids=name(gallery.tolist())) if form == "scores" else dict(
        ranked_ids=[name(row) for row in ranked])
    for target_ids in (None, targets):
        expected = compute_circo_metrics(ground_truth_ids=ground_truths, target_ids=target_ids, ks=(1, 5, 10), **as_ints)
        got = compute_circo_metrics(ground_truth_ids=[name(row) for row in ground_truths], ks=(1, 5, 10),
                                    target_ids=None if target_ids is None else name(target_ids), **as_strings)
        assert got == expected
    assert 0 < expected["map_at10"] < 100


def test_a_digit_string_beyond_int64_is_compared_as_a_string_not_an_overflow():
    # unify_id_dtypes tried to cast it to int64 and raised OverflowError ("Python int too large to convert to C long").
    from diffusers_cir.metrics import compute_circo_metrics

    huge = "99999999999999999999"
    got = compute_circo_metrics(ground_truth_ids=[[1]], ranked_ids=[[huge, "1"]], ks=(5,), scale="fraction")
    assert got == compute_circo_metrics(ground_truth_ids=[["1"]], ranked_ids=[[huge, "1"]], ks=(5,), scale="fraction")
    assert got == compute_circo_metrics(ground_truth_ids=[[1]], ranked_ids=[[2, 1]], ks=(5,), scale="fraction")


def test_ranked_lists_and_target_or_reference_counts_that_differ_are_named_like_the_score_form():
    # The ranked form said "the positives have 2" / "the excluded ids have 2" (internal names).
    with pytest.raises(ValueError, match="CIRR recall: `ranked_ids` has 1 lists but 2 reference ids were given"):
        compute_cirr_metrics(target_ids=["t"], reference_ids=["r", "q"], ranked_ids=[["r", "t"]], subset_ks=())
    with pytest.raises(ValueError, match="CIRR recall: `ranked_ids` has 1 lists but 2 target ids were given"):
        compute_cirr_metrics(target_ids=["t", "a"], reference_ids=["r", "r"], ranked_ids=[["r", "t"]], subset_ks=())
    with pytest.raises(ValueError, match="Recall@K: `ranked_ids` has 2 lists but 1 target ids were given"):
        recall_at_k(target_ids=["a"], ks=(1,), ranked_ids=[["a"], ["b"]])
    with pytest.raises(ValueError, match="Recall@K: `ranked_ids` has 1 lists but 2 excluded ids were given"):
        recall_at_k(target_ids=["a"], ks=(1,), ranked_ids=[["a"]], exclude_ids=["b", "c"])
    with pytest.raises(ValueError, match="CIRR recall: `scores` has 1 rows but 2 reference ids were given"):
        compute_cirr_metrics(target_ids=["c"], reference_ids=["a", "b"], scores=SCORES, gallery_ids=GALLERY, subset_ks=())


FASHIONIQ_DRESS = {"target_ids": ["b"], "ranked_ids": [["a", "b"]]}


@pytest.mark.parametrize(
    "shirt, error, message",
    [
        ({"target_ids": ["c"]}, ValueError, r"FashionIQ category 'shirt': Recall@K: pass `scores`"),
        ({"ranked_ids": [["c", "d"]]}, ValueError, "FashionIQ category 'shirt' has no `target_ids`"),
        ({"target_ids": ["c"], "ranked_ids": [["d", "c", "c"]]}, ValueError,
         r"FashionIQ category 'shirt': `ranked_ids\[0\]` lists id 'c' more than once"),
        ({"target_ids": ["c"], "ranked_ids": [["d"]]}, ValueError, "FashionIQ category 'shirt': Recall@2 is undetermined"),
        ({"target_ids": ["c"], "scores": [[0.1, 0.2]], "gallery_ids": ["c", "c"]}, ValueError,
         "FashionIQ category 'shirt': `gallery_ids` must be unique"),
        ([["c", "d"]], TypeError, "The inputs of category 'shirt' must be a dict"),
    ],
)
def test_fashioniq_names_the_category_whose_inputs_are_wrong(shirt, error, message):
    # The message used to be the same whichever category it came from (a list missing from "shirt" read as
    # "Recall@K: pass `scores` ..."), and a missing `target_ids` was a TypeError about a function argument.
    from diffusers_cir.metrics import DuplicateIdError, compute_fashioniq_metrics

    with pytest.raises(error, match=message) as raised:
        compute_fashioniq_metrics({"dress": FASHIONIQ_DRESS, "shirt": shirt}, ks=(1, 2))
    if "more than once" in message:
        assert isinstance(raised.value, DuplicateIdError)  # the class callers may catch is kept


def test_fashioniq_scores_custom_categories_and_reports_bad_options_without_a_category():
    from diffusers_cir.metrics import compute_fashioniq_metrics, fashioniq_recall_at_k

    # A custom split is scored like an official category (the averages are over the categories given).
    shoes = {"target_ids": ["c", "e"], "ranked_ids": [["c", "d"], ["d", "e"]]}
    got = compute_fashioniq_metrics({"dress": FASHIONIQ_DRESS, "shoes": shoes}, ks=(1,))
    assert got["shoes_recall_at1"] == fashioniq_recall_at_k(**shoes, ks=(1,))["recall_at1"] == 50.0
    assert got["average_recall_at1"] == (got["dress_recall_at1"] + got["shoes_recall_at1"]) / 2
    for options, message in ((dict(ks=(0,)), "`ks` must hold positive cutoffs"), (dict(scale="%"), "`scale` must be")):
        with pytest.raises(ValueError, match=message) as raised:
            compute_fashioniq_metrics({"dress": FASHIONIQ_DRESS}, **options)
        assert "category" not in str(raised.value)
    with pytest.raises(ValueError, match="`categories` is empty"):
        compute_fashioniq_metrics({})
