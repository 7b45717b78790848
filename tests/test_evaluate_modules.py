"""The `evaluate` modules of ``hub/metrics/`` load offline and reproduce every golden fixture number.

Same fixture discovery as ``test_metrics_fixtures.py`` (``tests/fixtures/metrics`` + ``DIFFUSERS_CIR_EXTRA_FIXTURES``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusers_cir.metrics import compute_circo_metrics, compute_cirr_metrics, genecis_recall_at_k

evaluate = pytest.importorskip("evaluate")

from test_metrics_fixtures import (  # noqa: E402  (helpers only; no tests are imported)
    FRACTION_TOLERANCE,
    PERCENT_TOLERANCE,
    assert_all_close,
    assert_circo_case_matches,
    fixtures_of,
    load_fixture,
    official_circo_server_metrics,
    official_circo_validation_metrics,
    official_cirr_metrics,
    official_fashioniq_metrics,
    official_genecis_metrics,
    rankings_from_scores,
)

MODULES = Path(__file__).resolve().parents[1] / "hub" / "metrics"
MODULE_NAMES = ("cirr", "fashioniq", "circo", "genecis")


@pytest.fixture(scope="module")
def modules():
    return {name: evaluate.load(str(MODULES / name), keep_in_memory=True) for name in MODULE_NAMES}


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_each_module_is_laid_out_as_a_hub_space(name):
    folder = MODULES / name
    for file in (f"{name}.py", "README.md", "app.py", "requirements.txt"):
        assert (folder / file).is_file(), f"{folder / file} missing"
    readme = (folder / "README.md").read_text()
    front_matter = readme.split("---")[1]
    for key in ("title:", "sdk: gradio", "app_file: app.py", "- evaluate", "- metric"):
        assert key in front_matter, f"{name} README metadata lacks {key!r}"
    assert "diffusers-cir" in (folder / "requirements.txt").read_text()


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_module_matches_official(path, modules):
    data = load_fixture(path)
    queries = data["inputs"]["queries"]
    got = modules["cirr"].compute(
        predictions=rankings_from_scores(data["inputs"]["scores"], data["inputs"]["gallery_ids"]),
        references=[query["target_id"] for query in queries],
        reference_ids=[query["reference_id"] for query in queries],
        group_members=[query["group_members"] for query in queries],
    )
    assert_all_close(got, official_cirr_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_module_accepts_int_ids_and_batches(path, modules):
    data = load_fixture(path)
    queries = data["inputs"]["queries"]
    to_int = {image: index for index, image in enumerate(data["inputs"]["gallery_ids"])}
    rankings = rankings_from_scores(data["inputs"]["scores"], data["inputs"]["gallery_ids"])
    columns = dict(
        predictions=[[to_int[i] for i in ranking] for ranking in rankings],
        references=[to_int[query["target_id"]] for query in queries],
        reference_ids=[to_int[query["reference_id"]] for query in queries],
        group_members=[[to_int[i] for i in query["group_members"]] for query in queries],
    )
    module = modules["cirr"]
    half = len(queries) // 2
    module.add_batch(**{key: values[:half] for key, values in columns.items()})
    module.add_batch(**{key: values[half:] for key, values in columns.items()})
    got = module.compute()
    assert_all_close(got, official_cirr_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("fashioniq_recall"))
def test_fashioniq_module_matches_official(path, modules):
    data = load_fixture(path)
    predictions, references, categories = [], [], []
    for category, inputs in data["inputs"]["categories"].items():
        predictions += rankings_from_scores(inputs["scores"], inputs["gallery_ids"], depth=50)
        references += [query["target"] for query in inputs["queries"]]
        categories += [category] * len(inputs["queries"])
    got = modules["fashioniq"].compute(predictions=predictions, references=references, categories=categories)
    assert_all_close(got, official_fashioniq_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("circo_map"))
def test_circo_module_matches_the_server(path, modules):
    data = load_fixture(path)
    queries = data["inputs"]["queries"]
    submission = data["inputs"]["submission_top50"]
    got = modules["circo"].compute(
        predictions=[submission[str(query["id"])] for query in queries],
        references=[query["gt_img_ids"] for query in queries],
        semantic_aspects=[query["semantic_aspects"] for query in queries],
        scale="fraction",
    )
    assert_all_close(got, official_circo_server_metrics(data), FRACTION_TOLERANCE)
    percent = modules["circo"].compute(
        predictions=[submission[str(query["id"])] for query in queries],
        references=[query["gt_img_ids"] for query in queries],
    )
    assert_all_close(percent, official_circo_validation_metrics(data), PERCENT_TOLERANCE)


@pytest.mark.parametrize("path", fixtures_of("circo_map_edgecases"))
def test_circo_module_edge_cases(path, modules):
    data = load_fixture(path)
    for case in data["cases"]:
        expected = case["official_output"]
        inputs = dict(predictions=[case["predictions"]], references=[case["annotation"]["gt_img_ids"]], scale="fraction")
        if "raises" in expected:
            with pytest.raises(ValueError, match="duplicate predictions"):
                modules["circo"].compute(**inputs)
            continue
        if expected["map_is_nan"]:
            with pytest.raises(ValueError, match="no ground truth"):
                modules["circo"].compute(**inputs)
            inputs["on_empty_ground_truth"] = "nan"
        assert_circo_case_matches(modules["circo"].compute(**inputs), case)


@pytest.mark.parametrize("path", fixtures_of("genecis_recall"))
def test_genecis_module_matches_official(path, modules):
    data = load_fixture(path)
    predictions, tasks = [], []
    for task, templates in data["inputs"]["tasks"].items():
        predictions += [template["candidate_scores"] for template in templates]
        tasks += [task] * len(templates)
    got = modules["genecis"].compute(
        predictions=predictions, references=[0] * len(predictions), tasks=tasks, scale="fraction"
    )
    assert_all_close(got, official_genecis_metrics(data), FRACTION_TOLERANCE)


def test_modules_report_bad_input_clearly(modules):
    with pytest.raises(ValueError, match="Unknown FashionIQ categories"):
        modules["fashioniq"].compute(predictions=[["a"]], references=["a"], categories=["shoes"])
    with pytest.raises(ValueError, match="target 't' of query 0 is not among its `group_members`"):
        modules["cirr"].compute(predictions=[["r", "t", "a"]], references=["t"], reference_ids=["r"],
                                group_members=[["r", "a"]], recall_ks=(1,), subset_ks=(1,))


def fresh(name):
    """A module instance of its own, for tests that add batches (the shared `modules` ones must stay empty)."""
    return evaluate.load(str(MODULES / name), keep_in_memory=True)


def _circo_columns(data):
    queries = data["inputs"]["queries"]
    submission = data["inputs"]["submission_top50"]
    return [submission[str(query["id"])] for query in queries], [query["gt_img_ids"] for query in queries]


@pytest.mark.parametrize("path", fixtures_of("circo_map"))
def test_circo_module_accepts_any_string_ids_also_mixed_with_int_batches(path):
    # The module declared int64 ids first: evaluate cast digit strings to int but refused "img_12"-style ids, and
    # the first batch fixed the column type, so a string batch after an int batch was refused too.
    data = load_fixture(path)
    predictions, references = _circo_columns(data)
    expected = official_circo_server_metrics(data)
    expected = {name: value for name, value in expected.items() if not name.startswith("semantic")}

    def name(ids):
        return [f"img_{image_id}" for image_id in ids]

    module = fresh("circo")
    got = module.compute(predictions=[name(row) for row in predictions], references=[name(row) for row in references],
                         scale="fraction")
    assert_all_close(got, expected, FRACTION_TOLERANCE)
    half = len(predictions) // 2
    module.add_batch(predictions=predictions[:half], references=references[:half])
    module.add_batch(predictions=[name(row) for row in predictions[half:]],
                     references=[name(row) for row in references[half:]])
    assert_all_close(module.compute(scale="fraction"), expected, FRACTION_TOLERANCE)
    # Digit strings still are the ints they spell, as the server's int cast reads them.
    module.add_batch(predictions=[[str(i) for i in row] for row in predictions[:half]],
                     references=[[f"0{i}" for i in row] for row in references[:half]])
    module.add_batch(predictions=predictions[half:], references=references[half:])
    assert_all_close(module.compute(scale="fraction"), expected, FRACTION_TOLERANCE)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(predictions=[[1, 2, 1]], references=[[1]]), ValueError, r"`predictions\[0\]` lists id '1' more than once"),
        (dict(predictions=[[1, 2]], references=[[3, 3]]), ValueError, r"`references\[0\]` lists id '3' more than once"),
        (dict(predictions=[[1, 2]], references=[[1], [2]]), ValueError,
         "`predictions` has 1 ranked lists but `references` has 2 ground-truth lists"),
        (dict(predictions=[1, 2], references=[[1], [2]]), TypeError, r"`predictions\[0\]` must be a list of ids, got int"),
        (dict(predictions=[[1.5]], references=[[1]]), TypeError, "`predictions` must contain int or str image ids"),
        (dict(predictions=[[1]], references=None), TypeError, "`references` must be a list of id lists"),
    ],
)
def test_circo_module_refuses_a_bad_batch_when_added_and_keeps_the_good_ones(bad, error, message):
    # A duplicate used to be stored and made compute() fail (losing every batch); the other bad batches were
    # refused with evaluate's generic "don't match the expected format" or not at all.
    module = fresh("circo")
    module.add_batch(predictions=[[5000, 101, 5001]], references=[[101, 102]])
    with pytest.raises(error, match=message):
        module.add_batch(**bad)
    with pytest.raises(ValueError, match=r"`predictions\[0\]` lists id 'x' more than once"):
        module.add(prediction=["x", "x"], reference=["img_1"])
    module.add(prediction=["x", "img_1", "y"], reference=["img_1", "img_2"])
    good = dict(predictions=[[5000, 101, 5001], ["x", "img_1", "y"]], references=[[101, 102], ["img_1", "img_2"]])
    expected = compute_circo_metrics(ranked_ids=good["predictions"], ground_truth_ids=good["references"], ks=(5,))
    assert module.compute(ks=(5,)) == expected
    assert fresh("circo").compute(**good, ks=(5,)) == expected


@pytest.mark.parametrize(
    "bad, error, message",
    [
        # Stored, then compute() failed (and, outside keep_in_memory, dropped every batch added before it).
        (dict(predictions=[[0.1, 0.2]], references=[5]), ValueError, r"`references\[0\]` is 5 but template 0 has 2 candidates"),
        (dict(predictions=[[float("nan"), 0.2]], references=[0]), ValueError, r"`predictions\[0\]` has a non-finite score"),
        (dict(predictions=[[]], references=[0]), ValueError, r"`predictions\[0\]` is empty"),
        (dict(predictions=[[0.1, 0.2]], references=[0.5]), TypeError, r"`references\[0\]` must be an int"),
        # Refused before, but with evaluate's generic messages.
        (dict(predictions=[[0.1, 0.2]], references=[0, 1]), ValueError, "`predictions` has 1 templates but `references` has 2"),
        (dict(predictions=[0.1, 0.2], references=[0, 0]), ValueError, r"`predictions\[0\]` must be a list of candidate scores"),
        (dict(predictions=None, references=[0]), TypeError, "`predictions` must hold one list of candidate scores per template"),
    ],
)
def test_genecis_module_refuses_a_bad_batch_when_added_and_keeps_the_good_ones(bad, error, message):
    module = fresh("genecis")
    module.add_batch(predictions=[[0.9, 0.2, 0.5]], references=[0])
    with pytest.raises(error, match=message):
        module.add_batch(**bad)
    with pytest.raises(ValueError, match=r"`references\[0\]` is 1 but template 0 has 1 candidates"):
        module.add(prediction=[0.3], reference=1)
    module.add_batch(predictions=[[0.1, 0.9], [0.4, 0.6, 0.5]], references=np.zeros(2))  # integral floats are fine
    expected = genecis_recall_at_k([[0.9, 0.2, 0.5], [0.1, 0.9], [0.4, 0.6, 0.5]], ks=(1, 2))
    assert module.compute(ks=(1, 2)) == expected
    assert 0 < expected["recall_at1"] < expected["recall_at2"] < 100


@pytest.mark.parametrize("tasks", [None, []])
def test_genecis_module_without_templates_says_predictions_is_empty(tasks, modules):
    # Used to be a TypeError about `positive_indices` (without tasks) or "`per_task` is empty" (with tasks).
    with pytest.raises(ValueError, match="There are no templates to score: `predictions` is empty"):
        modules["genecis"].compute(predictions=[], references=[], tasks=tasks)
    with pytest.raises(TypeError, match="`tasks` must hold one task name per template"):
        modules["genecis"].compute(predictions=[[0.5, 0.1]], references=[0], tasks="focus_object")


CIRR_GOOD = dict(predictions=[["r", "t", "a", "b"]], references=["t"], reference_ids=["r"], group_members=[["r", "t", "a"]])


@pytest.mark.parametrize(
    "bad, error, message",
    [
        # These were stored, and compute() then failed (dropping, outside keep_in_memory, every batch added before).
        (dict(group_members=[["r", "a"]]), ValueError, "target 't' of query 0 is not among its `group_members`"),
        (dict(predictions=[["r", "t", "t"]]), ValueError, r"`predictions\[0\]` lists id 't' more than once"),
        (dict(references=["r"]), ValueError, r"Query 0 has its reference as target \(`references\[0\]` = `reference_ids\[0\]`"),
        (dict(references=[None]), ValueError, r"`references\[0\]` is None"),
        # These were refused, with evaluate's generic messages or a KeyError.
        (dict(reference_ids=["r", "q"]), ValueError, "The columns of a batch must have one entry per query"),
        (dict(group_members=None), ValueError, "`group_members` missing"),
        (dict(references=[1.5]), TypeError, "`references` must contain int or str image ids"),
    ],
)
def test_cirr_module_refuses_a_bad_batch_when_added_and_keeps_the_good_ones(bad, error, message):
    from diffusers_cir.metrics import compute_cirr_metrics

    module = fresh("cirr")
    module.add_batch(**CIRR_GOOD)
    with pytest.raises(error, match=message):
        module.add_batch(**{key: value for key, value in dict(CIRR_GOOD, **bad).items() if value is not None})
    with pytest.raises(ValueError, match="target 't' of query 0 is not among its `group_members`"):
        module.add(prediction=["r", "x", "t"], reference="t", reference_ids="r", group_members=["r", "x"])
    module.add(prediction=["r", "x", "t"], reference="t", reference_ids="r", group_members=["r", "t", "x"])
    expected = compute_cirr_metrics(target_ids=["t", "t"], reference_ids=["r", "r"], recall_ks=(1,), subset_ks=(1,),
                                    ranked_ids=[["r", "t", "a", "b"], ["r", "x", "t"]],
                                    group_members=[["r", "t", "a"], ["r", "t", "x"]])
    assert module.compute(recall_ks=(1,), subset_ks=(1,)) == expected
    assert 0 < expected["recall_at1"] < 100


FASHIONIQ_GOOD = dict(predictions=[["a", "b"]], references=["b"], categories=["dress"])


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(categories=["shoes"]), ValueError, r"Unknown FashionIQ categories \['shoes'\] in `categories`"),
        (dict(predictions=[["a", "a"]]), ValueError, r"`predictions\[0\]` lists id 'a' more than once"),
        (dict(references=[None]), ValueError, r"`references\[0\]` is None"),
        (dict(categories="dress"), TypeError, "`categories` must hold one category name per query"),
        (dict(references=["b", "c"]), ValueError, "The columns of a batch must have one entry per query"),
        (dict(categories=None), ValueError, "`categories` missing"),
    ],
)
def test_fashioniq_module_refuses_a_bad_batch_when_added_and_keeps_the_good_ones(bad, error, message):
    from diffusers_cir.metrics import compute_fashioniq_metrics

    module = fresh("fashioniq")
    module.add_batch(**FASHIONIQ_GOOD)
    with pytest.raises(error, match=message):
        module.add_batch(**{key: value for key, value in dict(FASHIONIQ_GOOD, **bad).items() if value is not None})
    with pytest.raises(ValueError, match="Unknown FashionIQ categories"):
        module.add(prediction=["c", "d"], reference="c", categories="shoe")
    module.add(prediction=["c", "d"], reference="d", categories="shirt")
    expected = compute_fashioniq_metrics({"dress": {"target_ids": ["b"], "ranked_ids": [["a", "b"]]},
                                          "shirt": {"target_ids": ["d"], "ranked_ids": [["c", "d"]]}}, ks=(1, 2))
    assert module.compute(ks=(1, 2)) == expected
    assert expected["average_recall_at2"] == 100 > expected["average_recall_at1"]


# One small valid batch per module, and the library's numbers for it.
SMALL_BATCHES = {
    "cirr": dict(predictions=[["r", "x", "t", "y"], ["q", "t", "y", "x"]], references=["t", "t"],
                 reference_ids=["r", "q"], group_members=[["r", "t", "x"], ["q", "t", "x"]]),
    "fashioniq": dict(predictions=[["a", "b"], ["c", "d"]], references=["b", "c"], categories=["dress", "shirt"]),
    "circo": dict(predictions=[[5000, 101, 5001], [7, 8, 9]], references=[[101, 102], [9]]),
    "genecis": dict(predictions=[[0.2, 0.9, 0.1], [0.8, 0.3, 0.1]], references=[0, 0]),
}
BAD_OPTIONS = {
    "cirr": [(dict(recall_ks=(0, 1)), ValueError, "`recall_ks` must hold positive cutoffs"),
             (dict(scale="percentage"), ValueError, "`scale` must be"),
             (dict(recal_ks=(1,)), TypeError, r"compute\(\) got unknown options \['recal_ks'\]")],
    "fashioniq": [(dict(ks="10"), ValueError, "`ks` must be a positive integer K"),
                  (dict(scale=100), ValueError, "`scale` must be")],
    "circo": [(dict(on_empty_ground_truth="skip"), ValueError, "`on_empty_ground_truth` must be"),
              (dict(ks=(1.5,)), ValueError, "`ks` must hold integer cutoffs")],
    "genecis": [(dict(tasks="focus_object"), TypeError, "`tasks` must hold one task name per template"),
                (dict(ks=(0,)), ValueError, "`ks` must hold positive cutoffs")],
}


def library_metrics(name, columns, **options):
    from diffusers_cir.metrics import compute_cirr_metrics, compute_fashioniq_metrics

    if name == "cirr":
        return compute_cirr_metrics(target_ids=columns["references"], reference_ids=columns["reference_ids"],
                                    ranked_ids=columns["predictions"], group_members=columns["group_members"], **options)
    if name == "fashioniq":
        per_category = {}
        for prediction, reference, category in zip(columns["predictions"], columns["references"], columns["categories"]):
            inputs = per_category.setdefault(category, {"target_ids": [], "ranked_ids": []})
            inputs["target_ids"].append(reference)
            inputs["ranked_ids"].append(prediction)
        return compute_fashioniq_metrics(per_category, **options)
    if name == "circo":
        return compute_circo_metrics(ground_truth_ids=columns["references"], ranked_ids=columns["predictions"], **options)
    return genecis_recall_at_k(columns["predictions"], target_indices=columns["references"], **options)


GOOD_OPTIONS = {"cirr": dict(recall_ks=(1, 2), subset_ks=(1,)), "fashioniq": dict(ks=(1, 2)), "circo": dict(ks=(1, 5)),
                "genecis": dict(ks=(1, 2))}


@pytest.mark.parametrize("keep_in_memory", [True, False])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_compute_with_nothing_stored_says_so_in_both_storage_modes(name, keep_in_memory, tmp_path):
    # With keep_in_memory=True this was an AttributeError ('NoneType' object has no attribute 'getvalue') from
    # inside evaluate; the cache-file mode said "cache file doesn't exist".
    module = evaluate.load(str(MODULES / name), keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="There is nothing to compute: no batch is stored"):
        module.compute()
    module.add_batch(**SMALL_BATCHES[name])
    assert module.compute(**GOOD_OPTIONS[name]) == library_metrics(name, SMALL_BATCHES[name], **GOOD_OPTIONS[name])
    with pytest.raises(ValueError, match="There is nothing to compute: no batch is stored"):
        module.compute()  # the last compute() consumed the batches


@pytest.mark.parametrize("keep_in_memory", [True, False])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_a_compute_with_bad_options_keeps_the_stored_batches(name, keep_in_memory, tmp_path):
    # The options reached the metric only after evaluate had read (and so dropped) every stored batch: the next
    # compute() said nothing was added.
    module = evaluate.load(str(MODULES / name), keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    module.add_batch(**SMALL_BATCHES[name])
    for options, error, message in BAD_OPTIONS[name]:
        with pytest.raises(error, match=message):
            module.compute(**options)
        assert len(module) == 2
    assert module.compute(**GOOD_OPTIONS[name]) == library_metrics(name, SMALL_BATCHES[name], **GOOD_OPTIONS[name])
    assert not list(tmp_path.rglob("*.arrow"))  # evaluate still deletes its cache file after the compute


CIRR_SHORT = dict(predictions=[["q", "y", "x"]], references=["t"], reference_ids=["q"], group_members=[["q", "t", "x"]])


@pytest.mark.parametrize("keep_in_memory", [True, False])
def test_a_compute_that_fails_on_the_data_keeps_the_batches_added_before_it(keep_in_memory, tmp_path):
    # Recall@5 of a top-3 list (2 ids once the reference is deleted) that misses the target is undetermined: the
    # error is right, but it used to cost every stored batch. The batches added before are stored again; the inputs
    # passed to the failed compute() are not (the caller still has them, and a retry must not count them twice).
    module = evaluate.load(str(MODULES / "cirr"), keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    first = SMALL_BATCHES["cirr"]
    module.add_batch(**first)
    with pytest.raises(ValueError, match="Recall@5 is undetermined") as raised:
        module.compute(**CIRR_SHORT)
    assert "The 2 examples added before this compute() are still stored" in "".join(raised.value.__notes__)
    assert len(module) == 2
    both = {key: first[key] + CIRR_SHORT[key] for key in first}
    options = dict(recall_ks=(1, 2), subset_ks=(1,))
    assert module.compute(**CIRR_SHORT, **options) == library_metrics("cirr", both, **options)
    assert not list(tmp_path.rglob("*.arrow"))


@pytest.mark.parametrize("keep_in_memory", [True, False])
def test_circo_query_without_ground_truth_can_be_scored_after_the_refusal(keep_in_memory, tmp_path):
    # In the cache-file mode the refusal dropped every batch; with keep_in_memory=True the next add_batch started a
    # new buffer, so the batches added before the refusal were silently left out of the next compute().
    module = evaluate.load(str(MODULES / "circo"), keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    module.add_batch(**SMALL_BATCHES["circo"])
    module.add(prediction=[3, 4], reference=[])
    with pytest.raises(ValueError, match="has no ground truth"):
        module.compute(ks=(5,))
    module.add(prediction=["img_1", 12], reference=[12])
    columns = {"predictions": SMALL_BATCHES["circo"]["predictions"] + [[3, 4], ["img_1", 12]],
               "references": SMALL_BATCHES["circo"]["references"] + [[], [12]]}
    got = module.compute(ks=(5,), on_empty_ground_truth="nan", scale="fraction")
    expected = library_metrics("circo", columns, ks=(5,), on_empty_ground_truth="nan", scale="fraction")
    assert np.isnan(got["map_at5"]) and 0 < got["recall_at5"] < 1
    np.testing.assert_equal(got, expected)  # NaN equals NaN here


def test_genecis_tasks_of_another_length_keep_the_templates():
    from diffusers_cir.metrics import genecis_average_over_tasks

    module = fresh("genecis")
    module.add_batch(**SMALL_BATCHES["genecis"])
    with pytest.raises(ValueError, match="`tasks` has 3 entries but there are 2 templates"):
        module.compute(tasks=["focus_object"] * 3)
    module.add(prediction=[0.1, 0.7], reference=1)
    got = module.compute(tasks=["focus_object", "change_object", "change_object"], ks=(1, 2))
    predictions = SMALL_BATCHES["genecis"]["predictions"]
    expected = genecis_average_over_tasks({
        "focus_object": genecis_recall_at_k(predictions[:1], ks=(1, 2)),
        "change_object": genecis_recall_at_k([predictions[1], [0.1, 0.7]], target_indices=[0, 1], ks=(1, 2)),
    })
    assert got == expected


def test_stored_batches_mixin_example_runs(monkeypatch):
    import doctest

    from diffusers_cir.metrics import evaluate_support

    monkeypatch.chdir(MODULES.parents[1])  # the example loads "hub/metrics/cirr"
    result = doctest.testmod(evaluate_support, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _cirr_columns(data, name):
    """The fixture's CIRR columns with every id passed through `name`."""
    queries = data["inputs"]["queries"]
    rankings = rankings_from_scores(data["inputs"]["scores"], data["inputs"]["gallery_ids"])
    return dict(predictions=[[name(i) for i in ranking] for ranking in rankings],
                references=[name(query["target_id"]) for query in queries],
                reference_ids=[name(query["reference_id"]) for query in queries],
                group_members=[[name(i) for i in query["group_members"]] for query in queries])


@pytest.mark.parametrize("path", fixtures_of("cirr_recall"))
def test_cirr_module_mixes_string_and_int_batches(path):
    # The first batch fixed the id type: an int batch after a string one was refused with evaluate's generic
    # "Module inputs don't match the expected format", a string batch after an int one failed with "invalid
    # literal for int()", and a batch mixing both inside it was stored with its strings JSON-quoted ('"t"').
    data = load_fixture(path)
    position = {image: index for index, image in enumerate(data["inputs"]["gallery_ids"])}
    names = _cirr_columns(data, str)
    ints = _cirr_columns(data, position.__getitem__)
    digits = _cirr_columns(data, lambda image: str(position[image]))
    expected = official_cirr_metrics(data)
    half = len(names["references"]) // 2

    def halves(first, second):
        return ({key: values[:half] for key, values in first.items()}, {key: values[half:] for key, values in second.items()})

    module = fresh("cirr")
    for first, second in (halves(names, ints), halves(ints, digits), halves(digits, ints)):
        module.add_batch(**first)
        module.add_batch(**second)
        assert_all_close(module.compute(), expected, PERCENT_TOLERANCE)
    # Ints and strings inside one batch (each query compares its own ids: as strings here, ints as their spelling).
    mixed = {key: [row if index % 2 else (ints[key][index]) for index, row in enumerate(values)]
             for key, values in names.items()}
    assert_all_close(module.compute(**mixed), expected, PERCENT_TOLERANCE)
    assert module.compute(**mixed) == compute_cirr_metrics(
        target_ids=mixed["references"], reference_ids=mixed["reference_ids"], ranked_ids=mixed["predictions"],
        group_members=mixed["group_members"])


def test_cirr_module_refuses_names_after_int_batches_naming_the_argument():
    # Int batches are stored as ints (converting them would slow every int evaluation down); a later id that no int
    # spells cannot join them, and "07" would become 7 (equal to a "7" it is not equal to as a name).
    module = fresh("cirr")
    ints = dict(predictions=[[0, 2, 1, 3]], references=[1], reference_ids=[0], group_members=[[0, 1, 2]])
    module.add_batch(**ints)
    for bad, shown in (({"references": ["t"], "group_members": [[0, "t", 2]], "predictions": [[0, "t", 2]]}, "'t'"),
                       ({"references": ["07"], "group_members": [["00", "07"]], "predictions": [["00", "07"]],
                         "reference_ids": ["00"]}, "'00'")):
        with pytest.raises(ValueError, match=rf"`predictions` holds the string id {shown}, but the batches added "
                                             "before hold int ids"):
            module.add_batch(**dict(ints, **bad))
    module.add(prediction=["5", "7", "6"], reference="7", reference_ids="5", group_members=["5", "6", "7"])
    assert module.compute(recall_ks=(1, 2), subset_ks=(1,)) == compute_cirr_metrics(
        target_ids=[1, 7], reference_ids=[0, 5], ranked_ids=[[0, 2, 1, 3], [5, 7, 6]],
        group_members=[[0, 1, 2], [5, 6, 7]], recall_ks=(1, 2), subset_ks=(1,))


def cirr_batches_as_the_library_scores_each(batches, recall_ks, subset_ks):
    """Each batch scored by the library on its own (its queries compare their own ids), the hits pooled."""
    from diffusers_cir.metrics import cirr_per_query

    hits = [cirr_per_query(target_ids=batch["references"], reference_ids=batch["reference_ids"],
                           ranked_ids=batch["predictions"], group_members=batch["group_members"],
                           recall_ks=recall_ks, subset_ks=subset_ks) for batch in batches]
    metrics = {name: 100 * float(np.mean(np.concatenate([batch[name] for batch in hits]))) for name in hits[0]}
    if "recall_at5" in metrics and "recall_subset_at1" in metrics:
        metrics["avg"] = (metrics["recall_at5"] + metrics["recall_subset_at1"]) / 2
    if "recall_at1" in metrics and "recall_subset_at1" in metrics:
        metrics["avg_r1_rs1"] = (metrics["recall_at1"] + metrics["recall_subset_at1"]) / 2
    return metrics


def test_cirr_module_batch_mixing_ints_and_digit_strings_compares_them_like_the_library():
    # String columns next to int columns compare as ints when every string spells one ("07" is 7), as the library
    # casts them, whatever kind of ids the batches stored before hold.
    batch = dict(predictions=[[7, 5, 9], [1, 2, 3]], references=["07", "03"], reference_ids=[5, 1],
                 group_members=[[5, 7, 8], [1, 2, 3]])
    options = dict(recall_ks=(1, 2), subset_ks=(1,))
    alone = compute_cirr_metrics(target_ids=batch["references"], reference_ids=batch["reference_ids"],
                                 ranked_ids=batch["predictions"], group_members=batch["group_members"], **options)
    assert alone["recall_at1"] == 50.0  # "07" is the target 7 of the first query
    assert cirr_batches_as_the_library_scores_each([batch], **options) == alone
    names = dict(predictions=[["a", "c", "b"]], references=["b"], reference_ids=["a"], group_members=[["a", "b"]])
    ints = dict(predictions=[[10, 11]], references=[11], reference_ids=[10], group_members=[[10, 11]])
    for stored_first in (names, ints):
        module = fresh("cirr")
        module.add_batch(**stored_first)
        module.add_batch(**batch)
        assert module.compute(**options) == cirr_batches_as_the_library_scores_each([stored_first, batch], **options)
    module = fresh("cirr")
    module.add_batch(**batch)
    assert module.compute(**options) == alone
    with pytest.raises(ValueError, match=r"`predictions\[0\]` lists id '?7'? more than once"):
        module.add_batch(**dict(batch, predictions=[["07", 7, 9], [1, 2, 3]]))


def test_fashioniq_module_mixes_string_and_int_batches():
    from diffusers_cir.metrics import compute_fashioniq_metrics

    module = fresh("fashioniq")
    module.add_batch(predictions=[["a", "b"], ["c", "d"]], references=["b", "c"], categories=["dress", "shirt"])
    module.add_batch(predictions=[[1, 2], [3, "x"]], references=[2, "x"], categories=["dress", "toptee"])
    module.add(prediction=[4, "04"], reference="04", categories="shirt")  # compared as strings, "04" is not 4
    got = module.compute(ks=(1, 2))
    assert got == compute_fashioniq_metrics({
        "dress": {"target_ids": ["b", "2"], "ranked_ids": [["a", "b"], ["1", "2"]]},
        "shirt": {"target_ids": ["c", "04"], "ranked_ids": [["c", "d"], ["4", "04"]]},
        "toptee": {"target_ids": ["x"], "ranked_ids": [["3", "x"]]}}, ks=(1, 2))
    assert got["shirt_recall_at1"] == 50.0 and got["dress_recall_at1"] == 0.0
    module.add_batch(predictions=[[1, 2]], references=[1], categories=["dress"])
    with pytest.raises(ValueError, match="`references` holds the string id 'B0D1', but the batches added before hold int"):
        module.add_batch(predictions=[[3, 4]], references=["B0D1"], categories=["dress"])
    module.add_batch(predictions=[["3", "4"]], references=["4"], categories=["dress"])  # spells ints exactly: stored so
    assert module.compute(ks=(1,)) == compute_fashioniq_metrics(
        {"dress": {"target_ids": [1, 4], "ranked_ids": [[1, 2], [3, 4]]}}, ks=(1,))
