"""Evaluation is benchmark protocol (data) -> retrieval -> metrics: a protocol variant (other query texts, the
reference kept, a pipeline option fixed) is a small data change, and data and metrics know nothing of each other."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from diffusers_cir.evaluation import PROTOCOLS, IdHashEncoder, get_protocol, register_protocol, run_evaluation


def _cirr(root, num_images=9):
    names = [f"dev-{i}" for i in range(num_images)]
    root.mkdir(parents=True)
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {}, "img_set": {"id": i, "members": names[i: i + 6]}} for i in range(3)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    return root


class Recording(IdHashEncoder):
    """The stand-in, recording the texts and options each composed batch was given."""

    def __init__(self):
        super().__init__(embedding_dim=8)
        self.calls = []

    def __call__(self, image_embeds, prompt, **options):
        self.calls.append({"prompt": list(prompt), **options})
        return super().__call__(image_embeds, prompt)


@pytest.fixture
def variant():
    def texts(query, template):
        return [template.format(f"Find a picture that {query.captions[0]}.")]

    protocol = register_protocol(replace(get_protocol("cirr"), name="variant-for-test", query_texts=texts,
                                         exclude_reference=False, call_kwargs={"max_sequence_length": 75}))
    yield protocol
    PROTOCOLS["cirr"].pop("variant-for-test")


def test_a_protocol_variant_is_a_data_change(tmp_path, variant):
    root = _cirr(tmp_path / "CIRR")
    standard, changed = Recording(), Recording()
    run_evaluation(standard, "cirr", root, output_dir=tmp_path / "standard", progress=False)
    result = run_evaluation(changed, "cirr", root, output_dir=tmp_path / "variant", protocol="variant-for-test",
                            progress=False)
    assert standard.calls[0]["prompt"] == ["change 0", "change 1", "change 2"] and "max_sequence_length" not in standard.calls[0]
    assert changed.calls[0]["prompt"][0] == "Find a picture that change 0." and changed.calls[0]["max_sequence_length"] == 75
    assert result.report["settings"]["protocol"] == "variant-for-test"
    rankings = {name: json.loads((tmp_path / name / "rankings.json").read_text()) for name in ("standard", "variant")}
    captions = json.loads((root / "cap.rc2.val.json").read_text())
    for query in captions:
        assert query["reference"] not in rankings["standard"][str(query["pairid"])]
        assert query["reference"] in rankings["variant"][str(query["pairid"])]  # kept, as the variant says
    # The protocol's texts were composed: the saved queries are the stand-in's compositions of them.
    with safe_open(tmp_path / "variant" / "query_embeddings.safetensors", framework="pt") as handle:
        queries = handle.get_tensor("query_embeds")
    encoder = IdHashEncoder(8)
    expected = encoder(image_embeds=encoder.encode_image(["dev-0"]), prompt=["Find a picture that change 0."])
    torch.testing.assert_close(queries[0], torch.nn.functional.normalize(expected.image_embeds, dim=-1)[0])


def test_protocols_are_chosen_by_name_with_clear_errors(tmp_path):
    root = _cirr(tmp_path / "CIRR")
    with pytest.raises(ValueError, match=r"`protocol` must be one of \('standard', 'bgevl'\) for cirr, got 'nope'"):
        run_evaluation(IdHashEncoder(), "cirr", root, output_dir=tmp_path / "o", protocol="nope")
    with pytest.raises(ValueError, match=r"`caption_style` must be one of \('clip4cir', 'searle', 'bgevl', 'magiclens'\) for fashioniq"):
        run_evaluation(IdHashEncoder(), "fashioniq", root, output_dir=tmp_path / "o", caption_style="plain")
    with pytest.raises(ValueError, match="`protocol` 'standard' evaluates circo, not cirr"):
        run_evaluation(IdHashEncoder(), "cirr", root, output_dir=tmp_path / "o", protocol=get_protocol("circo"))
    with pytest.raises(ValueError, match="Unknown benchmark 'cir'"):
        run_evaluation(IdHashEncoder(), "cir", root, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    official = {"cirr": "standard", "fashioniq": "clip4cir", "circo": "standard", "genecis": "standard"}
    assert {name: get_protocol(name).name for name in official} == official  # the default is the official one
    assert "searle" in PROTOCOLS["fashioniq"]


@pytest.mark.parametrize("package, other", [("data", "metrics"), ("metrics", "data")])
def test_data_and_metrics_know_nothing_of_each_other(package, other):
    """The loaders and the metric formulas share their names through diffusers_cir.utils.benchmark_names."""
    modules = {"data": "diffusers_cir.data.benchmarks", "metrics": "diffusers_cir.metrics"}
    code = (f"import sys, {modules[package]}; "
            f"print(sorted(m for m in sys.modules if m.startswith('diffusers_cir.{other}') or 'pipelines' in m))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_docstring_examples_run():
    import doctest

    import diffusers_cir.evaluation.protocols as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
