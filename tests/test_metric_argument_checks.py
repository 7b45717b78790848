"""Argument checks of diffusers_cir.metrics: bad inputs fail with a message naming the argument, never a wrong number."""

import numpy as np
import pytest

from diffusers_cir.metrics import compute_cirr_metrics, genecis_recall_at_k, recall_at_k

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
