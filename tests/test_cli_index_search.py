"""`diffusers-cir index build` and `diffusers-cir search` end to end on a tiny gallery of generated images."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_components import tiny_image_encoder, tiny_image_processor, tiny_pipeline

from diffusers_cir.cli import main
from diffusers_cir.retrieval import GalleryIndex, IndexMismatchError, composed_search


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(12):
        # Blocky random images: distinct enough that the tiny encoder tells them apart.
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((48, 48), Image.NEAREST).save(images / f"photo{i:02d}.png")
    mask = Image.new("L", (48, 48), 0)
    mask.paste(255, (0, 0, 24, 24))
    mask.save(root / "mask.png")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "model")
    return root


def test_index_build_then_search_end_to_end(workspace, tmp_path, capsys):
    root = workspace
    assert main([
        "index", "build", "--images", str(root / "images"), "--model", str(root / "model"),
        "--output", str(tmp_path / "index"), "--batch-size", "5", "--part-size", "8", "--num-workers", "0",
        "--device", "cpu",
    ]) == 0
    assert "Indexed 12 images (Flat, width 16)" in capsys.readouterr().out
    index = GalleryIndex.load(tmp_path / "index")
    assert index.ntotal == 12 and index.model == str(root / "model")

    pipe = tiny_pipeline()  # same seeded weights as the saved one
    assert index.model_fingerprint == pipe.fingerprint
    # The indexed vectors are the pipeline's own (normalised) image embeddings of the files.
    paths = [m["path"] for m in index.metadata]
    embeds = pipe.encode_image([Image.open(p).convert("RGB") for p in paths]).numpy()
    expected = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    indexed = index._parts[0].reconstruct_n(0, 12)
    np.testing.assert_allclose(indexed, expected, atol=1e-5)

    assert main(["index", "info", str(tmp_path / "index")]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 12

    reference = root / "images" / "photo03.png"
    html_path = tmp_path / "page.html"
    json_path = tmp_path / "results" / "query.json"  # a folder that does not exist yet, like --html's
    assert main([
        "search", "--index", str(tmp_path / "index"), "--model", str(root / "model"), "--image", str(reference),
        "--text", "as a pencil sketch", "--negative-text", "blurry", "--mask", str(root / "mask.png"), "--k", "5",
        "--steps", "4", "--seed", "3", "--html", str(html_path), "--json", str(json_path), "--device", "cpu",
    ]) == 0
    out = capsys.readouterr().out
    assert "Left out of the results: photo03.png" in out
    rows = re.findall(r"^\s+(\d+)\s+(-?\d\.\d{4})\s+(\S+)", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    printed_ids = [r[2] for r in rows]
    assert "photo03.png" not in printed_ids

    # The same search in Python, in one call, gives the same ranking; it is the exact cosine ranking of the
    # composed query against the gallery, minus the reference.
    result = composed_search(
        pipe, index, image=reference, text="as a pencil sketch", negative_text="blurry", mask=root / "mask.png", k=5,
        num_inference_steps=4, generator=torch.Generator().manual_seed(3),
    )
    assert [hit.id for hit in result.hits] == printed_ids
    query = result.query_embeds.numpy()[0]
    cosine = expected @ (query / np.linalg.norm(query))
    ids = index.ids.tolist()
    ranking = [ids[i] for i in np.argsort(-cosine) if ids[i] != "photo03.png"][:5]
    assert printed_ids == ranking
    np.testing.assert_allclose([hit.score for hit in result.hits], [cosine[ids.index(i)] for i in ranking], atol=1e-5)

    page = html_path.read_text()
    assert page.count("data:image/jpeg;base64,") == 1 + 1 + 5  # reference, mask, 5 results
    assert "as a pencil sketch" in page and "blurry" in page
    assert all(item in page for item in printed_ids)
    saved = json.loads(json_path.read_text())
    assert [r["id"] for r in saved["results"]] == printed_ids and saved["results"][0]["rank"] == 1

    # --keep-reference: the reference itself (an exact gallery member) may come back.
    assert main([
        "search", "--index", str(tmp_path / "index"), "--image", str(reference), "--text", "same", "--k", "12",
        "--steps", "2", "--html", str(tmp_path / "p2.html"), "--keep-reference", "--device", "cpu",
    ]) == 0
    out = capsys.readouterr().out
    assert "Left out" not in out and "photo03.png" in out  # --model defaulted to the index's model


def test_index_build_from_list_file_with_ivf_and_resume(workspace, tmp_path, capsys):
    root = workspace
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"p{i}\t{root / 'images' / f'photo{i:02d}.png'}\n" for i in range(12)))
    args = [
        "index", "build", "--list", str(list_file), "--model", str(root / "model"), "--output", str(tmp_path / "idx"),
        "--factory", "IVF2,Flat", "--nprobe", "2", "--part-size", "4", "--num-workers", "0", "--device", "cpu",
    ]
    assert main(args) == 0
    first = GalleryIndex.load(tmp_path / "idx")
    assert first.search_parameters == {"nprobe": 2} and sorted(first.ids.tolist()) == sorted(f"p{i}" for i in range(12))
    capsys.readouterr()
    # Running again resumes: every part is already there, so the progress bar starts full.
    assert main(args) == 0
    assert "12/12" in capsys.readouterr().err


def test_search_refuses_an_index_of_another_model(workspace, tmp_path, capsys):
    root = workspace
    other = tiny_image_encoder(seed=1)
    other.save_pretrained(tmp_path / "other-clip")
    tiny_image_processor().save_pretrained(tmp_path / "other-clip")
    assert main([
        "index", "build", "--images", str(root / "images"), "--model", str(tmp_path / "other-clip"),
        "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu",
    ]) == 0
    capsys.readouterr()
    code = main([
        "search", "--index", str(tmp_path / "index"), "--model", str(root / "model"),
        "--image", str(root / "images" / "photo00.png"), "--text", "red", "--device", "cpu",
        "--html", str(tmp_path / "x.html"),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "not comparable" in err and "other-clip" in err
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(IndexMismatchError):
        composed_search(tiny_pipeline(), tmp_path / "index", image=root / "images" / "photo00.png", text="red")

    code = main(["search", "--index", str(tmp_path / "missing"), "--model", str(root / "model"), "--text", "x"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_index_info_of_a_missing_or_foreign_folder_is_a_message(tmp_path, capsys):
    assert main(["index", "info", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("diffusers-cir index info: error: Index folder")
    assert main(["index", "info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_index_records_an_absolute_model_folder_so_search_works_from_elsewhere(workspace, tmp_path, capsys, monkeypatch):
    root = workspace
    monkeypatch.chdir(root)
    assert main([
        "index", "build", "--images", "images", "--model", "model", "--output", str(tmp_path / "index"),
        "--num-workers", "0", "--device", "cpu",
    ]) == 0
    assert GalleryIndex.load(tmp_path / "index").model == str(root / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    # No --model: the index's own model folder is used, whatever the current directory.
    assert main([
        "search", "--index", str(tmp_path / "index"), "--image", str(root / "images" / "photo01.png"), "--text", "red",
        "--k", "3", "--steps", "2", "--device", "cpu",
    ]) == 0
    assert "photo" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []  # no page without --html (one was written into the current folder)


@pytest.mark.parametrize("flag", ["--shard-size", "--nprobe", "--ef-search", "--train-size", "--batch-size", "--part-size"])
def test_index_build_refuses_non_positive_sizes_before_embedding_anything(workspace, tmp_path, capsys, flag):
    root = workspace
    with pytest.raises(SystemExit) as exit_info:
        main([
            "index", "build", "--images", str(root / "images"), "--model", str(root / "model"),
            "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu", flag, "0",
        ])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()  # --shard-size 0 used to fail only after the whole gallery was embedded


def test_index_build_refuses_negative_num_workers_when_reading_the_command_line(workspace, tmp_path, capsys):
    """`--num-workers -1` was only refused by the DataLoader once the model had loaded, naming no flag."""
    with pytest.raises(SystemExit) as exit_info:
        main([
            "index", "build", "--images", str(workspace / "images"), "--model", str(workspace / "model"),
            "--output", str(tmp_path / "index"), "--num-workers", "-1", "--device", "cpu",
        ])
    assert exit_info.value.code == 2
    assert "argument --num-workers: expected 0 or a positive integer, got -1" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--factory", "IVFX"], r"--factory 'IVFX' is not a valid faiss index-factory string for 16-wide vectors: .*IVFX"),
        (["--factory", "PQ5"], r"--factory 'PQ5' is not a valid faiss index-factory string for 16-wide vectors"),
        (["--ondisk"], r"--ondisk needs an IVF factory \(on-disk inverted lists\); got 'Flat'"),
        (["--factory", "IVF2,Flat", "--shard-size", "4"], r"--shard-size applies to factories that need no training"),
        (["--nprobe", "3"], r"--nprobe applies to IVF indexes; 'Flat' is not one"),
        (["--factory", "IVF2,Flat", "--ef-search", "3"], r"--ef-search applies to HNSW indexes; 'IVF2,Flat' is not one"),
        (["--train-size", "10"], r"--train-size is the training sample of factories that need training .*'Flat' needs none"),
        (["--split", "validation"], r"--split applies to --dataset only; the gallery here comes from --images"),
        (["--image-column", "img", "--id-column", "name"], r"--image-column, --id-column apply to --dataset only; the gallery here comes from --images"),
    ],
)
def test_index_build_refuses_index_options_that_cannot_work_before_embedding_anything(workspace, tmp_path, capsys, extra,
                                                                                        message):
    """A bad --factory, --ondisk / --nprobe / --ef-search / --shard-size for the wrong kind of index failed only after
    the whole gallery had been embedded (naming `ondisk`, `nprobe`...); --train-size with a factory that needs no
    training and --split / --image-column / --id-column without --dataset were silently ignored."""
    assert main([
        "index", "build", "--images", str(workspace / "images"), "--model", str(workspace / "model"),
        "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu", *extra,
    ]) == 2
    assert re.search(f"^diffusers-cir (index build|search): error: {message}", capsys.readouterr().err, flags=re.MULTILINE)
    assert not (tmp_path / "index").exists()


def test_index_options_are_checked_with_the_names_of_the_library_arguments():
    from diffusers_cir.retrieval import check_index_options

    check_index_options(16, "IVF4,PQ4", train_size=100, nprobe=2, ondisk=True)
    check_index_options(16, "HNSW32", efSearch=8, shard_size=10)
    with pytest.raises(ValueError, match=r"`train_size` is the training sample .*'HNSW32' needs none"):
        check_index_options(16, "HNSW32", train_size=100)
    with pytest.raises(ValueError, match=r"`efSearch` applies to HNSW indexes; 'IVF4,Flat' is not one"):
        check_index_options(16, "IVF4,Flat", efSearch=3)
    for key, value in (("shard_size", 0), ("train_size", True), ("nprobe", 2.5), ("efSearch", -1)):
        with pytest.raises(ValueError, match=f"`{key}` must be an integer >= 1, got {value!r}"):
            check_index_options(16, "Flat", **{key: value})


def test_search_checks_its_command_line_before_loading_the_pipeline(workspace, tmp_path, capsys, monkeypatch):
    """A missing or unreadable --image / --mask, --steps 0 and an --exclude-id that is not in the index failed only
    after the pipeline had loaded (naming `image`, `num_inference_steps`) or, for the id, excluded nothing without a
    word; --mask without --image was used as a mask of no reference."""
    import diffusers_cir.retrieval

    assert main(["index", "build", "--images", str(workspace / "images"), "--model", str(workspace / "model"),
                 "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu"]) == 0
    capsys.readouterr()

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the command line was checked")

    monkeypatch.setattr(diffusers_cir.retrieval, "load_pipeline", no_pipeline)
    (tmp_path / "notes.png").write_text("not an image")
    search = ["search", "--index", str(tmp_path / "index"), "--text", "red", "--device", "cpu",
              "--html", str(tmp_path / "page.html")]
    reference = str(workspace / "images" / "photo03.png")
    for flag, named in (("--num-inference-steps", "--num-inference-steps/--steps"), ("--steps", "--num-inference-steps/--steps"),
                        ("--k", "--k")):
        with pytest.raises(SystemExit) as exit_info:
            main([*search, "--image", reference, flag, "0"])
        assert exit_info.value.code == 2
        assert f"argument {named}: expected a positive integer, got 0" in capsys.readouterr().err
    for extra, message in [
        (["--image", str(tmp_path / "missing.png")], r"--image '.*missing\.png': there is no file there\."),
        (["--image", reference, "--mask", str(tmp_path / "missing.png")], r"--mask '.*missing\.png': there is no file"),
        (["--image", str(tmp_path / "notes.png")], r"--image '.*notes\.png' could not be read as an image"),
        (["--mask", str(workspace / "mask.png")], r"--mask marks the region of the reference image to change: give "
                                                  r"the reference with --image\."),
        (["--image", reference, "--exclude-id", "photo99.png"], r"--exclude-id 'photo99\.png': not an id of this index "
                                                                r"\(its ids look like '.*photo00\.png'"),
    ]:
        assert main([*search, *extra]) == 2
        assert re.search(f"^diffusers-cir (index build|search): error: {message}", capsys.readouterr().err, flags=re.MULTILINE), message
    assert not (tmp_path / "page.html").exists()

    from diffusers_cir.commands.search import _exclude_ids

    integer_ids = np.array([10, 11, 12], dtype=np.int64)
    assert _exclude_ids(["11", "12"], integer_ids) == [11, 12]
    with pytest.raises(ValueError, match=r"--exclude-id 'x11': the ids of this index are integers"):
        _exclude_ids(["x11"], integer_ids)
    with pytest.raises(ValueError, match=r"--exclude-id 13: not an id of this index \(its ids look like 10, 11, 12\)"):
        _exclude_ids(["13"], integer_ids)


def test_index_and_search_with_a_pipeline_without_a_sampler(workspace, tmp_path, capsys):
    """LinCIR through the same road: its tower embeds the gallery, its queries are composed from the reference's
    pixels; the sampler's --steps and a --negative-text it cannot take are refused by flag before it loads."""
    from test_lincir_pipeline import tiny_pipeline as tiny_lincir

    tiny_lincir(with_vision=True).save_pretrained(tmp_path / "lincir")
    assert main(["index", "build", "--images", str(workspace / "images"), "--model", str(tmp_path / "lincir"),
                 "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu"]) == 0
    search = ["search", "--index", str(tmp_path / "index"), "--image", str(workspace / "images" / "photo02.png"),
              "--text", "is red", "--k", "3", "--device", "cpu"]
    capsys.readouterr()
    assert main(search) == 0
    assert "Left out of the results: photo02.png" in capsys.readouterr().out
    for extra, message in ((["--num-inference-steps", "4"], "--num-inference-steps: LinCIRPipeline"),
                           (["--negative-text", "x", "--steps", "2"], "--num-inference-steps, --negative-prompt: LinCIRPipeline")):
        assert main(search + extra) == 2
        assert message in capsys.readouterr().err
