"""Map cache: round trip, atomic replacement, and a clear error for every damaged or foreign folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, map_set_exists, read_map_set, write_map_set


def make_map_set(seed: int = 0, n: int = 4, height: int = 6, width: int = 13) -> MapSet:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, height, width), dtype=bool)
    masks[: n // 2, 1:3, 2:9] = True
    return MapSet(
        m_disc=rng.random((n, height, width), dtype=np.float32),
        m_recon=rng.random((n, height, width)).astype(np.float16),
        masks=masks,
        labels=(np.arange(n) < n // 2).astype(np.int8),
        image_ids=[f"test/{'crack' if i < n // 2 else 'good'}/{i:03d}" for i in range(n)],
        meta={
            "dataset": "demo",
            "category": "squares",
            "epoch": 10 + seed,
            "split": "test",
            "image_size": height,
            "data_root": None,
            "mask_paths": [f"/data/gt/{i:03d}.png" if i < n // 2 else None for i in range(n)],
            "profile": "cpu",
        },
    )


def assert_same(read: MapSet, written: MapSet) -> None:
    np.testing.assert_array_equal(read.m_disc, written.m_disc)
    np.testing.assert_array_equal(read.m_recon, written.m_recon.astype(np.float32))
    np.testing.assert_array_equal(read.masks, written.masks)
    np.testing.assert_array_equal(read.labels, written.labels)
    assert read.image_ids == written.image_ids
    assert {key: read.meta[key] for key in written.meta} == written.meta


def test_round_trip(tmp_path: Path) -> None:
    written = make_map_set()
    target = tmp_path / "maps" / "epoch-0010"
    write_map_set(target, written)
    read = read_map_set(target)
    assert_same(read, written)
    assert read.m_disc.dtype == np.float32 and isinstance(read.m_disc, np.memmap)
    assert read.masks.dtype == bool and read.masks.shape == (4, 6, 13)
    assert read.meta["version"] == 2 and read.meta["map_shape"] == [4, 6, 13]
    assert map_set_exists(target)
    assert sorted(path.name for path in target.iterdir()) == [
        "image_ids.json",
        "labels.npy",
        "m_disc.npy",
        "m_recon.npy",
        "masks.npy",
        "meta.json",
    ]


def test_rewrite_replaces_the_old_set_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    target = tmp_path / "epoch-0010"
    write_map_set(target, make_map_set(seed=0))
    newer = make_map_set(seed=1)
    write_map_set(target, newer)
    assert_same(read_map_set(target), newer)
    assert [path.name for path in tmp_path.iterdir()] == ["epoch-0010"]


def test_failed_write_leaves_the_previous_set_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "epoch-0010"
    old = make_map_set(seed=0)
    write_map_set(target, old)
    real_save, calls = np.save, []

    def save_then_fail(file, array, **kwargs):  # writes one file, then fails like a full disk
        calls.append(array.shape)
        if len(calls) > 1:
            raise OSError("No space left on device")
        real_save(file, array, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_map_set(target, make_map_set(seed=1))
    monkeypatch.undo()
    assert_same(read_map_set(target), old)
    assert [path.name for path in tmp_path.iterdir()] == ["epoch-0010"]


def test_map_set_exists_needs_every_file_and_a_readable_version(tmp_path: Path) -> None:
    target = tmp_path / "maps"
    assert not map_set_exists(target)
    write_map_set(target, make_map_set())
    (target / "labels.npy").unlink()
    assert not map_set_exists(target)
    write_map_set(target, make_map_set())
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "version": 3}))
    assert not map_set_exists(target)


def test_version_1_float16_caches_are_still_read(tmp_path: Path) -> None:
    target = tmp_path / "maps"
    written = make_map_set()
    write_map_set(target, written)
    for name in ("m_disc", "m_recon"):  # as version 1 wrote them
        np.save(target / f"{name}.npy", getattr(written, name).astype(np.float16))
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    assert map_set_exists(target)
    read = read_map_set(target)
    assert read.m_disc.dtype == np.float16 and read.meta["version"] == 1
    np.testing.assert_array_equal(read.m_disc, written.m_disc.astype(np.float16))
    with pytest.raises(InputError, match="expected float16"):
        np.save(target / "m_recon.npy", written.m_recon.astype(np.float32))
        read_map_set(target)


def test_a_folder_that_is_not_a_map_cache_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("keep me")
    with pytest.raises(InputError, match="not a map cache"):
        write_map_set(tmp_path / "results", make_map_set())
    assert (tmp_path / "results" / "table.csv").read_text() == "keep me"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: setattr(m, "m_recon", m.m_recon[:, :5]), "share one"),
        (lambda m: setattr(m, "masks", m.masks.astype(np.uint8)), "masks must be bool"),
        (lambda m: setattr(m, "labels", m.labels + 1), "labels"),
        (lambda m: setattr(m, "image_ids", m.image_ids[:-1]), "image_ids"),
        (lambda m: m.m_disc.__setitem__((0, 0, 0), np.nan), "m_disc has NaN"),
        (lambda m: m.m_recon.__setitem__((0, 0, 0), np.inf), "m_recon has NaN"),
        (lambda m: m.meta.pop("epoch"), "lacks epoch"),
        (lambda m: m.meta.__setitem__("mask_paths", []), "mask_paths"),
        (lambda m: m.meta.__setitem__("data_root", Path("/data")), "JSON"),
    ],
)
def test_inconsistent_map_sets_are_not_written(tmp_path: Path, change, match: str) -> None:
    maps = make_map_set()
    change(maps)
    with pytest.raises(InputError, match=match):
        write_map_set(tmp_path / "maps", maps)
    assert not (tmp_path / "maps").exists()


def test_missing_folder_or_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_map_set(tmp_path / "nowhere")
    for name in ("meta.json", "m_disc.npy", "m_recon.npy", "masks.npy", "labels.npy", "image_ids.json"):
        target = tmp_path / f"without-{name}"
        write_map_set(target, make_map_set())
        (target / name).unlink()
        with pytest.raises(InputError, match=f"{target / name} is missing"):
            read_map_set(target)


@pytest.mark.parametrize("version", [None, 0, 3, "1", True])
def test_wrong_or_missing_version_is_rejected(tmp_path: Path, version: object) -> None:
    target = tmp_path / "maps"
    write_map_set(target, make_map_set())
    meta = json.loads((target / "meta.json").read_text())
    if version is None:
        del meta["version"]
    else:
        meta["version"] = version
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"meta\.json has version .*expected one of \[1, 2\]"):
        read_map_set(target)


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("m_recon.npy", np.zeros((4, 6, 12), dtype=np.float16)),
        ("m_disc.npy", np.zeros((4, 6, 13), dtype=np.float16)),
        ("masks.npy", np.zeros((4, 6, 13), dtype=np.uint8)),
        ("labels.npy", np.zeros(3, dtype=np.int8)),
    ],
)
def test_mismatched_arrays_name_the_file(tmp_path: Path, name: str, array: np.ndarray) -> None:
    target = tmp_path / "maps"
    write_map_set(target, make_map_set())
    np.save(target / name, array)
    with pytest.raises(InputError, match=rf"{name} holds .*expected"):
        read_map_set(target)


def test_wrong_number_of_image_ids_and_corrupt_files_are_rejected(tmp_path: Path) -> None:
    target = tmp_path / "maps"
    write_map_set(target, make_map_set())
    (target / "image_ids.json").write_text(json.dumps(["test/good/000"]))
    with pytest.raises(InputError, match=r"image_ids\.json lists 1 image ids: expected 4"):
        read_map_set(target)
    write_map_set(target, make_map_set())
    (target / "m_disc.npy").write_bytes(b"not an npy file")
    with pytest.raises(InputError, match=r"cannot read map cache file .*m_disc\.npy"):
        read_map_set(target)
    (target / "meta.json").write_text("{broken")
    with pytest.raises(InputError, match=r"meta\.json"):
        read_map_set(target)
