"""Indexes and gallery embeddings under faults and attack: every file is checked against the checksums written with it,
every path a manifest names stays in its folder, one writer per folder, and bad input to GalleryIndex is refused by
name. Each case ends in a clear error naming the file (or argument), a counted skip, or the correct result.

Before: 64 flipped bytes in index.faiss or ids.npy, or a reversed ids.npy, loaded and returned wrong results (the
manifest only recorded sizes); a manifest part `../../other/index.faiss` was read from outside the folder; two
`index build` runs into one folder both said "Indexed"; `GalleryIndex.from_embeddings` of an empty gallery with
`ids=[]` failed on "dtype float64". Helpers simulate a second writer with a real second process holding the lock.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from lock_holder import held_by_another_process

from diffusers_cir.cli import main
from diffusers_cir.evaluation import IdHashEncoder
from diffusers_cir.retrieval import (
    GalleryEmbeddings,
    GalleryIndex,
    IndexFormatError,
    build_index_from_embedding_files,
    encode_gallery,
)
from diffusers_cir.utils import checksums
from diffusers_cir.utils.checksums import ChecksumError
from diffusers_cir.utils.locks import LOCK_NAME, FolderLockedError, folder_lock

pytestmark = pytest.mark.usefixtures("single_thread")

DIM = 16


# --------------------------------------------------------------------------------------------------- helpers
def flip(path: Path, count: int = 64, offset: int | None = None) -> None:
    """Invert ``count`` bytes of ``path`` in place (same size), by default in its last quarter (past any header)."""
    data = bytearray(path.read_bytes())
    start = len(data) * 3 // 4 if offset is None else offset
    for position in range(start, min(start + count, len(data))):
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))




class _WritesMarker:
    """Unpickling this writes a marker file: the code a crafted .npy would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _crafted_object_npy(path: Path, marker: Path) -> None:
    array = np.empty(3, dtype=object)
    array[:] = [_WritesMarker(marker), "b", "c"]
    np.save(path, array, allow_pickle=True)
    np.load(path, allow_pickle=True)  # an unrestricted load does run it (so the tests below could fail)
    assert marker.read_text() == "ran"
    marker.unlink()


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((200, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def saved_index(vectors, tmp_path_factory):
    index = GalleryIndex.from_embeddings(vectors, ids=[f"img{i:03d}" for i in range(200)],
                                         metadata=[{"path": f"{i:03d}.png"} for i in range(200)], model="toy")
    return index.save(tmp_path_factory.mktemp("index") / "index")


@pytest.fixture
def index_copy(saved_index, tmp_path):
    return Path(shutil.copytree(saved_index, tmp_path / "copy"))


def _top1(folder: Path, vectors: np.ndarray, **load_kwargs) -> list:
    return [ids[0] for ids in GalleryIndex.load(folder, **load_kwargs).search(vectors[:20], k=1).ids]


# ------------------------------------------------------------------------------------- index: changed bytes
def test_an_intact_index_finds_every_vector_itself(saved_index, vectors):
    assert _top1(saved_index, vectors) == [f"img{i:03d}" for i in range(20)]


def _reverse_ids(folder):
    np.save(folder / "ids.npy", np.load(folder / "ids.npy")[::-1])


def _swap_metadata_lines(folder):
    lines = (folder / "metadata.jsonl").read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    (folder / "metadata.jsonl").write_text("".join(lines))


def _change_manifest_value(folder):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"name": "toy"', '"name": "yot"'))


def _ids_of_another_index(folder):
    other = [f"img{i:03d}" for i in range(199, -1, -1)]  # the same ids, the same size, another order
    np.save(folder / "ids.npy", np.asarray(other))


DAMAGE = {
    "64 bytes flipped in index.faiss": ("index.faiss", lambda folder: flip(folder / "index.faiss")),
    "64 bytes flipped in ids.npy": ("ids.npy", lambda folder: flip(folder / "ids.npy")),
    "ids.npy reversed": ("ids.npy", _reverse_ids),
    "ids.npy of another index, same size": ("ids.npy", _ids_of_another_index),
    "1 byte flipped at the start of index.faiss": ("index.faiss", lambda folder: flip(folder / "index.faiss", 1, 0)),
    "two metadata lines swapped": ("metadata.jsonl", _swap_metadata_lines),
    "a manifest value changed": ("manifest.json", _change_manifest_value),
}


@pytest.mark.parametrize("name", list(DAMAGE), ids=list(DAMAGE))
def test_changed_bytes_at_the_same_size_are_refused_naming_the_file(index_copy, name):
    damaged_file, damage = DAMAGE[name]
    size = (index_copy / damaged_file).stat().st_size
    damage(index_copy)
    assert (index_copy / damaged_file).stat().st_size == size
    with pytest.raises(IndexFormatError, match=rf"{damaged_file} does not match the xxh3_128 checksum.*Rebuild"):
        GalleryIndex.load(index_copy)


def test_the_reversed_ids_were_a_silent_wrong_answer_without_the_checksums(index_copy, vectors):
    _reverse_ids(index_copy)
    # What a size check alone gives (the flag's documented trade-off): every result names the wrong image.
    assert _top1(index_copy, vectors, verify_checksums=False) == [f"img{199 - i:03d}" for i in range(20)]


@pytest.mark.parametrize("mmap", [False, True], ids=["memory", "mmap"])
def test_the_checksums_are_verified_whichever_way_the_index_is_read(index_copy, mmap):
    flip(index_copy / "index.faiss")
    with pytest.raises(IndexFormatError, match="index.faiss does not match"):
        GalleryIndex.load(index_copy, mmap=mmap)


def test_skipping_verification_hashes_nothing_but_still_checks_sizes(index_copy, vectors, monkeypatch):
    hashed = []
    real = checksums.file_digest
    monkeypatch.setattr(checksums, "file_digest", lambda *args, **kwargs: hashed.append(args[0]) or real(*args, **kwargs))
    assert _top1(index_copy, vectors, verify_checksums=False)[:3] == ["img000", "img001", "img002"]
    assert hashed == []
    GalleryIndex.load(index_copy)
    assert sorted(Path(path).name for path in hashed) == ["ids.npy", "index.faiss", "manifest.json", "metadata.jsonl"]
    (index_copy / "index.faiss").write_bytes((index_copy / "index.faiss").read_bytes()[:-100])
    with pytest.raises(IndexFormatError, match="index.faiss has .* bytes but .* were written"):
        GalleryIndex.load(index_copy, verify_checksums=False)


# ------------------------------------------------------------------------------ index: files and manifests
def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


OUTSIDE = ["../../other/index.faiss", "../index.faiss", "/etc/passwd", "sub/index.faiss", "..", "", "a\\..\\b"]


@pytest.mark.parametrize("path", OUTSIDE, ids=[repr(path) for path in OUTSIDE])
def test_a_manifest_part_path_outside_the_folder_is_refused_before_anything_is_read(tmp_path, saved_index, path,
                                                                                 monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(saved_index, other)  # a real index two levels up: what `../../other/index.faiss` would read
    folder = tmp_path / "a" / "b" / "index"
    shutil.copytree(saved_index, folder)
    _edit_manifest(folder, lambda manifest: manifest["parts"][0].update(file=path))
    import faiss

    read = []
    monkeypatch.setattr(faiss, "read_index", lambda *args: read.append(args) or pytest.fail("read a file"))
    with pytest.raises(IndexFormatError, match="plain file names inside its own folder"):
        GalleryIndex.load(folder, verify_checksums=False)
    assert read == []


def test_a_manifest_listing_a_file_outside_the_folder_is_refused(index_copy):
    _edit_manifest(index_copy, lambda manifest: manifest["files"].update({"../../secret": 10}))
    with pytest.raises(IndexFormatError, match="'../../secret'"):
        GalleryIndex.load(index_copy, verify_checksums=False)


def test_a_checksum_file_naming_a_path_outside_the_folder_is_refused(index_copy):
    listed = json.loads((index_copy / "checksums.json").read_text())
    listed["files"]["../../etc/passwd"] = {"size": 1, "digest": "0"}
    (index_copy / "checksums.json").write_text(json.dumps(listed))
    with pytest.raises(IndexFormatError, match="not a path inside"):
        GalleryIndex.load(index_copy)


def test_a_link_leading_outside_the_folder_is_refused(index_copy, tmp_path):
    outside = tmp_path / "elsewhere.faiss"
    shutil.move(index_copy / "index.faiss", outside)
    (index_copy / "index.faiss").symlink_to(outside)
    with pytest.raises(IndexFormatError, match="link leading outside"):
        GalleryIndex.load(index_copy, verify_checksums=False)


def test_missing_malformed_or_incomplete_checksums_are_named(index_copy):
    checksum_file = index_copy / "checksums.json"
    text = checksum_file.read_text()
    checksum_file.write_text("{not json")
    with pytest.raises(IndexFormatError, match="checksums.json cannot be read"):
        GalleryIndex.load(index_copy)
    listed = json.loads(text)
    del listed["files"]["ids.npy"]
    checksum_file.write_text(json.dumps(listed))
    with pytest.raises(IndexFormatError, match=r"does not list \['ids.npy'\]"):
        GalleryIndex.load(index_copy)
    checksum_file.unlink()
    with pytest.raises(IndexFormatError, match="checksums.json is missing"):
        GalleryIndex.load(index_copy)


def _sizes_agree(folder: Path) -> None:
    """Record the files' present sizes in the manifest: a folder whose damage a size check cannot see."""
    _edit_manifest(folder, lambda manifest: manifest["files"].update(
        {name: (folder / name).stat().st_size for name in manifest["files"]}))


FORMAT_FAULTS = {
    "index.faiss truncated": (lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes()[:1000]),
                              "index.faiss has 1000 bytes"),
    "ids.npy missing": (lambda f: (f / "ids.npy").unlink(), "ids.npy is missing"),
    "a metadata line missing": (
        lambda f: (f / "metadata.jsonl").write_text("".join((f / "metadata.jsonl").read_text().splitlines(True)[1:])),
        "metadata.jsonl has"),
    "a metadata line missing, sizes updated": (
        lambda f: ((f / "metadata.jsonl").write_text("".join((f / "metadata.jsonl").read_text().splitlines(True)[1:])),
                   _sizes_agree(f)),
        "metadata.jsonl has 199 entries for 200 indexed vectors"),
    "manifest ntotal wrong": (lambda f: _edit_manifest(f, lambda m: m.update(ntotal=199)), "manifest: 199"),
    "manifest part count wrong": (lambda f: _edit_manifest(f, lambda m: m["parts"][0].update(ntotal=150)),
                                  "the manifest says 150"),
    "manifest parts not a list": (lambda f: _edit_manifest(f, lambda m: m.update(parts={"file": "index.faiss"})),
                                  "'parts' must list"),
    "manifest files not sizes": (lambda f: _edit_manifest(f, lambda m: m.update(files=["index.faiss"])),
                                 "'files' must map"),
    "ids of the wrong length": (lambda f: (np.save(f / "ids.npy", np.asarray(["a", "b"])), _sizes_agree(f)),
                                r"ids.npy holds \(2,\) ids for 200 indexed vectors"),
    "ids of floats": (lambda f: (np.save(f / "ids.npy", np.zeros(200)), _sizes_agree(f)), "ids.npy holds float64"),
    "a metadata line that is not an object": (
        lambda f: ((f / "metadata.jsonl").write_text("[1]\n" + "".join((f / "metadata.jsonl").read_text()
                                                                       .splitlines(True)[1:])), _sizes_agree(f)),
        r"metadata.jsonl:1 is not a JSON object"),
    "a metadata file that is not UTF-8": (
        lambda f: ((f / "metadata.jsonl").write_bytes(b"\xff\xfe" * 20), _sizes_agree(f)), "Could not read .*metadata"),
}


@pytest.mark.parametrize("name", list(FORMAT_FAULTS), ids=list(FORMAT_FAULTS))
def test_damaged_files_and_manifests_are_named_even_unverified(index_copy, name):
    fault, message = FORMAT_FAULTS[name]
    fault(index_copy)
    with pytest.raises(IndexFormatError, match=message):
        GalleryIndex.load(index_copy, verify_checksums=False)
    with pytest.raises(IndexFormatError):  # and with verification (usually caught first, by the checksums)
        GalleryIndex.load(index_copy)


def test_a_pickled_ids_file_is_refused_and_its_code_never_runs(index_copy, tmp_path):
    marker = tmp_path / "marker"
    _crafted_object_npy(index_copy / "ids.npy", marker)
    for verify in (False, True):
        with pytest.raises(IndexFormatError, match="ids.npy"):
            GalleryIndex.load(index_copy, verify_checksums=verify)
    assert not marker.exists()


def test_an_index_folder_that_is_a_file_or_missing_is_named(tmp_path):
    (tmp_path / "index").write_text("not a folder")
    with pytest.raises(IndexFormatError, match="is a file, not an index folder"):
        GalleryIndex.load(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="does not exist"):
        GalleryIndex.load(tmp_path / "missing")


def test_an_index_saved_before_checksums_loads_with_a_warning_until_saved_again(index_copy, vectors):
    (index_copy / "checksums.json").unlink()
    _edit_manifest(index_copy, lambda manifest: manifest.pop("checksums"))
    with pytest.warns(UserWarning, match="without content checksums .* Save it again"):
        index = GalleryIndex.load(index_copy)
    assert index.search(vectors[:3], k=1).ids == [["img000"], ["img001"], ["img002"]]
    index.save(index_copy)
    flip(index_copy / "ids.npy")
    with pytest.raises(IndexFormatError, match="ids.npy does not match"):
        GalleryIndex.load(index_copy)


def test_the_search_command_names_the_damaged_file_in_one_line(index_copy, capsys):
    flip(index_copy / "ids.npy")
    assert main(["search", "--index", str(index_copy), "--text", "red", "--model", "unused", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("diffusers-cir search: error: ") and "ids.npy does not match" in error
    assert len(error.splitlines()) == 1


# ------------------------------------------------------------------------------------- gallery embeddings
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for number in range(10):
        PIL.Image.new("RGB", (8, 8), (20 * number, 0, 0)).save(folder / f"{number}.png")
    return folder


@pytest.fixture(scope="module")
def embedded(image_folder, tmp_path_factory):
    """10 images embedded in parts of 4 (3 parts), by a model-free encoder."""
    output = tmp_path_factory.mktemp("gallery") / "embeddings"
    encode_gallery(IdHashEncoder(DIM), image_folder, output, part_size=4, show_progress=False)
    return output


@pytest.fixture
def embedded_copy(embedded, tmp_path):
    return Path(shutil.copytree(embedded, tmp_path / "embeddings"))


def _all_embeddings(folder: Path) -> tuple[np.ndarray, list]:
    gallery = GalleryEmbeddings(folder)
    parts = list(gallery.iter_parts())
    return np.concatenate([np.asarray(e) for e, _, _ in parts]), [i for _, ids, _ in parts for i in ids]


def _swap_item_ids(folder):
    path = folder / "parts" / "items-00001.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["id"], records[1]["id"] = records[1]["id"], records[0]["id"]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


PART_DAMAGE = {
    "64 bytes flipped in an embeddings part": ("embeddings-00001.npy", lambda f: flip(f / "parts" / "embeddings-00001.npy")),
    "two ids swapped in an items part": ("items-00001.jsonl", _swap_item_ids),
}


@pytest.mark.parametrize("name", list(PART_DAMAGE), ids=list(PART_DAMAGE))
def test_a_changed_part_is_refused_on_read_on_resume_and_on_build(embedded_copy, image_folder, tmp_path, name):
    damaged_file, damage = PART_DAMAGE[name]
    damage(embedded_copy)
    pattern = rf"{damaged_file} does not match the xxh3_128 checksum.*delete .*embeddings-00001.npy"
    with pytest.raises(ChecksumError, match=pattern):
        list(GalleryEmbeddings(embedded_copy).iter_parts())
    with pytest.raises(ChecksumError, match=pattern):
        build_index_from_embedding_files(embedded_copy, tmp_path / "index", show_progress=False)
    assert not (tmp_path / "index" / "manifest.json").exists()
    with pytest.raises(ChecksumError, match=pattern):
        encode_gallery(IdHashEncoder(DIM), image_folder, embedded_copy, part_size=4, show_progress=False)


def test_a_deleted_part_is_embedded_again_to_the_same_bytes(embedded, embedded_copy, image_folder):
    (embedded_copy / "parts" / "embeddings-00001.npy").unlink()
    encode_gallery(IdHashEncoder(DIM), image_folder, embedded_copy, part_size=4, show_progress=False)
    for name in ("embeddings-00001.npy", "items-00001.jsonl", "checksums-00001.json"):
        assert (embedded_copy / "parts" / name).read_bytes() == (embedded / "parts" / name).read_bytes(), name


def test_a_part_interrupted_before_its_checksums_is_embedded_again(embedded, embedded_copy, image_folder):
    (embedded_copy / "parts" / "checksums-00002.json").unlink()  # killed after its files, before its checksums
    flip(embedded_copy / "parts" / "embeddings-00002.npy")  # ... which it had half written
    with pytest.raises(ValueError, match=r"part\(s\) \[2\] are missing or have no checksums"):
        GalleryEmbeddings(embedded_copy)
    encode_gallery(IdHashEncoder(DIM), image_folder, embedded_copy, part_size=4, show_progress=False)
    np.testing.assert_array_equal(_all_embeddings(embedded_copy)[0], _all_embeddings(embedded)[0])


PART_FAULTS = {
    "a truncated .npy part": (lambda f: (f / "parts" / "embeddings-00000.npy").write_bytes(
        (f / "parts" / "embeddings-00000.npy").read_bytes()[:100]), r"embeddings-00000.npy cannot be read"),
    "a manifest with a wrong count": (
        lambda f: (f / "gallery.json").write_text((f / "gallery.json").read_text().replace('"num_items": 10', '"num_items": 11')),
        "records 11 images .* parts hold 10 embeddings"),
    "a manifest that is not JSON": (lambda f: (f / "gallery.json").write_text("{"), "gallery.json cannot be read"),
    "a part of another width": (lambda f: np.save(f / "parts" / "embeddings-00002.npy", np.zeros((2, 3), np.float32)),
                                "holds 3-wide embeddings"),
    "a part of float64": (lambda f: np.save(f / "parts" / "embeddings-00002.npy", np.zeros((2, DIM))),
                          "holds float64"),
    "an items line missing": (
        lambda f: (f / "parts" / "items-00000.jsonl").write_text(
            "".join((f / "parts" / "items-00000.jsonl").read_text().splitlines(True)[1:])),
        "items-00000.jsonl lists 3 items for 4 embeddings"),
}


@pytest.mark.parametrize("name", list(PART_FAULTS), ids=list(PART_FAULTS))
def test_damaged_gallery_folders_are_named_even_unverified(embedded_copy, name):
    fault, message = PART_FAULTS[name]
    fault(embedded_copy)
    with pytest.raises(ValueError, match=message):
        list(GalleryEmbeddings(embedded_copy, verify_checksums=False).iter_parts())
    with pytest.raises(ValueError):
        list(GalleryEmbeddings(embedded_copy).iter_parts())


def test_a_pickled_embeddings_part_is_refused_and_its_code_never_runs(embedded_copy, tmp_path):
    marker = tmp_path / "marker"
    _crafted_object_npy(embedded_copy / "parts" / "embeddings-00002.npy", marker)
    for verify in (False, True):
        with pytest.raises(ValueError, match="embeddings-00002.npy"):
            list(GalleryEmbeddings(embedded_copy, verify_checksums=verify).iter_parts())
    assert not marker.exists()


def test_a_gallery_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "embeddings").write_text("")
    with pytest.raises(ValueError, match="is a file, not a gallery embeddings folder"):
        GalleryEmbeddings(tmp_path / "embeddings")


def test_a_gallery_embedded_before_checksums_still_builds_with_a_warning(embedded, embedded_copy, image_folder, tmp_path):
    for path in (embedded_copy / "parts").glob("checksums-*.json"):
        path.unlink()
    manifest = json.loads((embedded_copy / "gallery.json").read_text())
    del manifest["checksums"]
    (embedded_copy / "gallery.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="earlier diffusers-cir"):
        index = build_index_from_embedding_files(embedded_copy, tmp_path / "index", show_progress=False)
    assert index.ntotal == 10
    (embedded_copy / "parts" / "embeddings-00002.npy").unlink()  # resumed: the old parts are kept, the new one checked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_gallery(IdHashEncoder(DIM), image_folder, embedded_copy, part_size=4, show_progress=False)
    messages = " | ".join(str(warning.message) for warning in caught)
    assert "kept unverified" in messages and "its parts have no checksums" in messages
    assert (embedded_copy / "parts" / "checksums-00002.json").exists()
    with pytest.warns(UserWarning, match="its parts have no checksums"):
        np.testing.assert_array_equal(_all_embeddings(embedded_copy)[0], _all_embeddings(embedded)[0])


def test_a_gallery_whose_images_were_all_skipped_is_not_indexed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for number in range(3):
        (images / f"{number}.png").write_bytes(b"not an image")

    class PixelMeans:
        embedding_dim, fingerprint = 3, "pixel-means"

        def encode_image(self, images, batch_size=64):
            return torch.tensor(np.stack([np.asarray(image, np.float32).mean((0, 1)) for image in images]))

    with pytest.warns(UserWarning, match="3 unreadable images were skipped"):
        gallery = encode_gallery(PixelMeans(), images, tmp_path / "embeddings", skip_unreadable=True, show_progress=False)
    assert gallery.num_items == 0 and len(gallery.skipped()) == 3
    with pytest.raises(ValueError, match="holds no embeddings \\(3 images skipped as unreadable.*nothing to index"):
        build_index_from_embedding_files(gallery, tmp_path / "index", show_progress=False)


# ------------------------------------------------------------------------------- GalleryIndex from arrays
def test_an_empty_gallery_is_refused_with_what_to_check(vectors):
    for ids in ([], None):
        with pytest.raises(ValueError, match=r"`embeddings` is empty \(shape \(0, 16\)\): there is nothing to index"):
            GalleryIndex.from_embeddings(np.zeros((0, DIM), np.float32), ids=ids)


def test_adding_nothing_to_an_index_changes_nothing(vectors):
    index = GalleryIndex.from_embeddings(vectors[:5], ids=[f"a{i}" for i in range(5)])
    index.add(np.zeros((0, DIM), np.float32), ids=[])
    assert index.ntotal == 5 and index.ids.tolist() == [f"a{i}" for i in range(5)]


def _with_row(vectors, row, value):
    broken = vectors[:8].copy()
    broken[row, 2] = value
    return broken


ARRAY_FAULTS = {
    "a NaN row": (lambda v: {"embeddings": _with_row(v, 3, np.nan)}, r"NaN or inf in rows \[3\]"),
    "an inf row": (lambda v: {"embeddings": _with_row(v, 5, np.inf)}, r"NaN or inf in rows \[5\]"),
    "an all-zero row": (lambda v: {"embeddings": np.concatenate([v[:2], np.zeros((1, DIM), np.float32)])},
                        r"all-zero rows \[2\]"),
    "ids of the wrong length": (lambda v: {"embeddings": v[:8], "ids": ["a", "b"]}, "1-D sequence of 8 ids"),
    "duplicate ids": (lambda v: {"embeddings": v[:3], "ids": ["a", "b", "a"]}, r"duplicates: \['a'\]"),
    "float ids": (lambda v: {"embeddings": v[:3], "ids": [0.5, 1.5, 2.5]}, "integers or strings; got dtype float64"),
    "ids mixing ints and strings": (lambda v: {"embeddings": v[:3], "ids": [1, "b", 3]}, "all integers or all strings"),
    "metadata of the wrong length": (lambda v: {"embeddings": v[:3], "metadata": [{}]}, "one entry per embedding"),
    "metadata that is not a dict": (lambda v: {"embeddings": v[:2], "metadata": [{}, "x"]}, "entry 1 is str"),
    "a 3-D array": (lambda v: {"embeddings": v[:8].reshape(2, 4, DIM)}, r"2-D array \[N, D\]; got shape \(2, 4, 16\)"),
}


@pytest.mark.parametrize("name", list(ARRAY_FAULTS), ids=list(ARRAY_FAULTS))
def test_bad_embeddings_ids_and_metadata_are_refused_by_name(vectors, name):
    make, message = ARRAY_FAULTS[name]
    with pytest.raises(ValueError, match=message):
        GalleryIndex.from_embeddings(**make(vectors))


QUERY_FAULTS = {
    "a meta-device tensor": (lambda: torch.empty(1, DIM, device="meta"), "is a tensor on the meta device"),
    "text": (lambda: "a red car", "must be numbers"),
    "ragged lists": (lambda: [[1.0] * DIM, [1.0]], "must be numbers"),
    "a NaN tensor": (lambda: torch.full((1, DIM), float("nan")), r"NaN or inf in rows \[0\]"),
    "a zero query": (lambda: np.zeros((1, DIM), np.float32), r"all-zero rows \[0\]"),
}


@pytest.mark.parametrize("name", list(QUERY_FAULTS), ids=list(QUERY_FAULTS))
def test_bad_queries_are_refused_by_name(vectors, name):
    make, message = QUERY_FAULTS[name]
    with pytest.raises(ValueError, match=rf"`queries` .*{message}"):
        GalleryIndex.from_embeddings(vectors[:20]).search(make(), k=3)


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-25, 1e-40], ids=["1e30", "1e20", "1e-25", "1e-40 (subnormal)"])
def test_queries_and_galleries_of_extreme_magnitude_rank_as_at_unit_scale(vectors, scale):
    """Cosine ranking does not depend on scale; in float32 the squares overflowed past ~1e19 (the query became all
    zeros and every score 0: an arbitrary ranking, silently) or underflowed."""
    index = GalleryIndex.from_embeddings(vectors[:40])
    expected = index.search(vectors[40:44], k=5)
    found = index.search(vectors[40:44] * np.float32(scale), k=5)
    assert found.ids == expected.ids
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
    scaled = GalleryIndex.from_embeddings(vectors[:40] * np.float32(scale)).search(vectors[40:44], k=5)
    assert scaled.ids == expected.ids


# ------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_of_an_index_folder_is_refused_naming_it(tmp_path, vectors):
    index = GalleryIndex.from_embeddings(vectors[:10])
    with held_by_another_process(tmp_path / "index"):
        with pytest.raises(FolderLockedError, match=rf"Another process is writing to {tmp_path / 'index'}.*another folder"):
            index.save(tmp_path / "index")
        assert not (tmp_path / "index" / "manifest.json").exists()
    index.save(tmp_path / "index")  # free again once the other process is gone
    assert GalleryIndex.load(tmp_path / "index").ntotal == 10


def test_a_killed_writer_leaves_no_lock_behind(tmp_path, vectors):
    with held_by_another_process(tmp_path / "index") as child:
        child.kill()
        child.wait(timeout=60)
        GalleryIndex.from_embeddings(vectors[:4]).save(tmp_path / "index")
    assert (tmp_path / "index" / "manifest.json").exists()


def test_a_second_gallery_encoding_into_the_same_folder_is_refused(image_folder, tmp_path):
    with held_by_another_process(tmp_path / "embeddings"), pytest.raises(FolderLockedError, match="embeddings"):
        encode_gallery(IdHashEncoder(DIM), image_folder, tmp_path / "embeddings", show_progress=False)
    assert not (tmp_path / "embeddings" / "gallery.json").exists()


def test_the_lock_is_reentrant_within_a_process_and_released_after_an_error(tmp_path, vectors):
    with folder_lock(tmp_path / "index"):
        GalleryIndex.from_embeddings(vectors[:4]).save(tmp_path / "index")  # save takes the same lock again
    with pytest.raises(ValueError), folder_lock(tmp_path / "index"):
        raise ValueError("a failed write")
    with held_by_another_process(tmp_path / "index"):  # the failed write released it
        pass


def test_a_lock_on_a_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"), folder_lock(tmp_path / "out"):
        pass


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_components import tiny_pipeline

    folder = tmp_path_factory.mktemp("model") / "model"
    tiny_pipeline().save_pretrained(folder)
    return folder


def test_two_index_builds_into_one_folder_the_second_is_refused_before_embedding(image_folder, tiny_model, tmp_path,
                                                                                capsys):
    argv = ["index", "build", "--images", str(image_folder), "--model", str(tiny_model), "--output",
            str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu", "--no-resume"]
    with held_by_another_process(tmp_path / "index"):
        assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith(f"diffusers-cir index build: error: Another process is writing to {tmp_path / 'index'}")
    assert "pass another --output" in error
    assert not (tmp_path / "index" / "embeddings").exists()
    assert main(argv) == 0
    assert GalleryIndex.load(tmp_path / "index").ntotal == 10


# --------------------------------------------------------------------------------------- 16-bit images
def test_a_16_bit_image_is_indexed_like_its_8_bit_rendering_not_as_white(tmp_path):
    """The loader fix, checked where an index is built (the pipelines check it in their contract tests)."""
    images = tmp_path / "images"
    images.mkdir()
    eight = np.tile(np.arange(10, 170, 10, dtype=np.uint16), (16, 1))
    PIL.Image.fromarray(eight * 257).save(images / "wide.png")
    assert PIL.Image.open(images / "wide.png").mode.startswith("I")
    PIL.Image.fromarray(eight.astype(np.uint8)).convert("RGB").save(images / "eight.png")
    PIL.Image.new("RGB", (16, 16), (255, 255, 255)).save(images / "white.png")

    class PixelStatistics:
        embedding_dim, fingerprint = 6, "pixel-statistics"

        def encode_image(self, images, batch_size=64):
            arrays = [np.asarray(image, np.float32) / 255 for image in images]
            return torch.tensor(np.stack([np.concatenate([a.mean((0, 1)), a.std((0, 1)) + 0.01]) for a in arrays]))

    gallery = encode_gallery(PixelStatistics(), images, tmp_path / "embeddings", show_progress=False)
    index = build_index_from_embedding_files(gallery, tmp_path / "index", show_progress=False)
    embeddings = dict(zip(*reversed(_all_embeddings(tmp_path / "embeddings"))))
    np.testing.assert_allclose(embeddings["wide.png"], embeddings["eight.png"], atol=1e-3)
    assert embeddings["wide.png"][0] < 0.4  # a mean of 85/255, not white (1.0)
    assert index.search(embeddings["eight.png"][None], k=2).ids[0][1] in {"wide.png", "eight.png"}
    assert index.search(embeddings["white.png"][None], k=1).ids == [["white.png"]]


# ---------------------------------------------------------------------------------------------------- hub
def test_a_pushed_folder_leaves_the_writers_lock_file_out(tmp_path, monkeypatch):
    import huggingface_hub

    from diffusers_cir.utils.hub import upload_folder_to_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
            seen["ignored"] = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                               if any(p.match(pattern) for pattern in ignore_patterns or [])]
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with folder_lock(tmp_path / "data" / "images"):
        pass
    with folder_lock(tmp_path / "data"):
        pass
    (tmp_path / "data" / "README.md").write_text("card")
    upload_folder_to_hub(tmp_path / "data", "me/data", repo_type="dataset")
    assert sorted(seen["ignored"]) == [LOCK_NAME, f"images/{LOCK_NAME}"]
