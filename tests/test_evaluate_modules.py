"""The `evaluate` modules of ``hub/metrics/`` load offline and reproduce every golden fixture number.

Same fixture discovery as ``test_metrics_fixtures.py`` (``tests/fixtures/metrics`` + ``DIFFUSERS_CIR_EXTRA_FIXTURES``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusers_cir.metrics import compute_circo_metrics, genecis_recall_at_k

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
