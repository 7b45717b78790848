"""HTML reports: the evaluation report read from what ``diffusers-cir evaluate`` wrote, and its pieces."""

import json
import re

import pytest

from diffusers_cir.cli import main
from diffusers_cir.report.evaluation import metric_rows
from diffusers_cir.report.html import QueryView, ResultView, metrics_table, query_grid
from diffusers_cir.report.plots import recall_at_k_svg, recall_curves


def test_metric_rows_split_subsets_and_average():
    report = {"benchmark": "fashioniq", "split": "val", "subsets": ["dress", "shirt"],
              "metrics": {"dress_recall_at10": 20.0, "dress_recall_at50": 40.0, "shirt_recall_at10": 10.0,
                          "shirt_recall_at50": 30.0, "average_recall_at10": 15.0, "average_recall_at50": 35.0,
                          "average_recall": 25.0}}
    rows = metric_rows(report)
    assert list(rows) == ["dress", "shirt", "average"]
    assert rows["shirt"] == {"recall_at10": 10.0, "recall_at50": 30.0} and rows["average"]["recall"] == 25.0
    assert recall_curves(rows["average"]) == {10: 15.0, 50: 35.0}
    cirr = metric_rows({"benchmark": "cirr", "split": "val", "metrics": {"recall_at1": 30.0, "avg": 50.0}})
    assert cirr == {"cirr val": {"recall_at1": 30.0, "avg": 50.0}}


def test_table_marks_the_best_and_the_plot_is_inline_svg():
    table = metrics_table({"a": {"recall_at1": 0.5}, "b": {"recall_at1": 0.7}})
    assert "<td><b>0.700</b></td>" in table and "<td>0.500</td>" in table and "Recall@1" in table
    svg = recall_at_k_svg({"a": {1: 0.2, 5: 0.5, 10: 0.6}})
    assert svg.startswith("<svg") and "</svg>" in svg
    assert recall_at_k_svg({"a": {1: 0.2}}) == ""  # one point is no curve


def test_query_grid_outlines_hits_and_survives_missing_pictures(tmp_path):
    from PIL import Image

    picture = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture)
    view = QueryView("q", "make it red", reference=picture, reference_id="ref",
                     targets=[ResultView("a", image=picture, is_hit=True)],
                     results={"m": [ResultView("x", 0.9, tmp_path / "missing.png"), ResultView("a", 0.8, picture, True)]})
    grid = query_grid([view])
    assert grid.count('<figure class="hit">') == 1 and "no image" in grid and grid.count("data:image/png;base64,") == 3


@pytest.fixture
def cirr_with_pictures(tmp_path):
    """A CIRR-layout folder whose images are picture-world pictures (the report shows real thumbnails)."""
    from diffusers_cir.data.pictures import PictureWorld, PictureWorldConfig

    world = PictureWorld(PictureWorldConfig.tiny())
    root = tmp_path / "CIRR"
    (root / "dev").mkdir(parents=True)
    ids = world.gallery_ids[:24]
    for number, item_id in enumerate(ids):
        world.picture(number).save(root / "dev" / f"{item_id}.png")
    (root / "split.rc2.val.json").write_text(json.dumps({item_id: f"dev/{item_id}.png" for item_id in ids}))
    captions = [{"pairid": n, "reference": ids[n], "caption": f"change number {n}", "target_hard": ids[n + 1],
                 "img_set": {"members": ids[n:n + 6]}} for n in range(10)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    return root


def test_evaluate_html_writes_the_report_next_to_the_metrics(cirr_with_pictures, tmp_path, capsys):
    output = tmp_path / "eval"
    assert main(["evaluate", "cirr", "--dry-run", "--data-root", str(cirr_with_pictures), "--output-dir", str(output),
                 "--no-progress", "--html"]) == 0
    page = (output / "report.html").read_text()
    assert f"Wrote {output / 'report.html'}" in capsys.readouterr().out
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert f"{metrics['recall_at1']:.3f}" in page and "<svg" in page
    rankings = json.loads((output / "rankings.json").read_text())
    captions = json.loads((cirr_with_pictures / "cap.rc2.val.json").read_text())
    hits = sum(entry["target_hard"] in rankings[str(entry["pairid"])][:10] for entry in captions)
    assert page.count('<figure class="hit">') == hits  # every query is shown (10 <= 12): each hit outlined once
    assert len(re.findall("data:image/png;base64,", page)) >= 10 * 11  # reference, target and the top 10 are pictures


def test_evaluation_report_without_the_benchmark_folder_has_the_metrics_only(cirr_with_pictures, tmp_path):
    from diffusers_cir.report.evaluation import write_evaluation_report

    output = tmp_path / "eval"
    assert main(["evaluate", "cirr", "--dry-run", "--data-root", str(cirr_with_pictures), "--output-dir", str(output),
                 "--no-progress"]) == 0
    assert not (output / "report.html").exists()  # only with --html
    page = write_evaluation_report(output).read_text()
    assert "Recall@1" in page and "<h2>Queries</h2>" not in page
    with pytest.raises(FileNotFoundError, match="holds no metrics.json"):
        write_evaluation_report(tmp_path)
