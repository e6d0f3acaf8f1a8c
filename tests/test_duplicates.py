"""Duplicate detection: fingerprints from real image files, pigeonhole search vs brute force, groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from errors import UserError
from metadata.duplicates import (
    ImageFingerprint,
    duplicate_groups,
    find_duplicate_pairs,
    fingerprint_images,
)


def _smooth_image(seed: int, size: int = 128) -> Image.Image:
    """A lesion-like smooth RGB image: random low-resolution noise upsampled bicubically."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def _save_jpeg(img: Image.Image, path: Path, quality: int = 95) -> str:
    img.save(path, format="JPEG", quality=quality)
    return str(path)


def _pairs_of(image_ids: list[str], paths: list[str], max_distance: int = 4) -> pd.DataFrame:
    fingerprints, errors = fingerprint_images(image_ids, paths)
    assert errors == []
    return find_duplicate_pairs(fingerprints, max_distance=max_distance)


def test_identical_bytes_are_an_exact_pair(tmp_path: Path) -> None:
    original = _save_jpeg(_smooth_image(1), tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(Path(original).read_bytes())
    pairs = _pairs_of(["img_b", "img_a"], [str(tmp_path / "b.jpg"), original])
    assert pairs.to_dict("records") == [
        {"image_id_a": "img_a", "image_id_b": "img_b", "kind": "exact", "distance": 0}
    ]


@pytest.mark.parametrize("variant", ["requality", "resize"])
def test_resaved_image_is_a_near_pair(tmp_path: Path, variant: str) -> None:
    img = _smooth_image(2)
    original = _save_jpeg(img, tmp_path / "a.jpg", quality=95)
    if variant == "requality":
        copy = _save_jpeg(img, tmp_path / "b.jpg", quality=60)
    else:
        copy = _save_jpeg(img.resize((120, 120), Image.Resampling.BILINEAR), tmp_path / "b.jpg")
    pairs = _pairs_of(["a", "b"], [original, copy])
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row["image_id_a"], row["image_id_b"], row["kind"]) == ("a", "b", "near")
    assert 0 <= row["distance"] <= 4


def test_different_images_are_not_paired(tmp_path: Path) -> None:
    paths = [_save_jpeg(_smooth_image(seed), tmp_path / f"{seed}.jpg") for seed in (10, 11, 12)]
    pairs = _pairs_of(["x", "y", "z"], paths)
    assert pairs.empty
    assert list(pairs.columns) == ["image_id_a", "image_id_b", "kind", "distance"]


def test_groups_follow_chains_and_cover_every_image() -> None:
    pairs = pd.DataFrame(
        {"image_id_a": ["a", "b"], "image_id_b": ["b", "c"], "kind": ["near", "exact"], "distance": [3, 0]}
    )
    groups = duplicate_groups(["c", "d", "b", "a"], pairs)
    assert sorted(groups.index) == ["a", "b", "c", "d"]
    assert groups.index.is_unique
    assert groups.to_dict() == {"a": "a", "b": "a", "c": "a", "d": "d"}


def test_groups_reject_pairs_with_unknown_ids() -> None:
    pairs = pd.DataFrame({"image_id_a": ["a"], "image_id_b": ["zzz"], "kind": ["near"], "distance": [1]})
    with pytest.raises(ValueError, match="zzz"):
        duplicate_groups(["a", "b"], pairs)


def test_truncated_jpeg_raises_or_is_listed(tmp_path: Path) -> None:
    good = _save_jpeg(_smooth_image(3), tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])

    with pytest.raises(UserError, match="ISIC_bad") as excinfo:
        fingerprint_images(["ISIC_good", "ISIC_bad"], [good, str(bad)], on_error="raise")
    assert str(bad) in str(excinfo.value)
    assert "remove or replace" in str(excinfo.value)

    fingerprints, errors = fingerprint_images(["ISIC_good", "ISIC_bad"], [good, str(bad)], on_error="skip")
    assert [fp.image_id for fp in fingerprints] == ["ISIC_good"]
    assert [image_id for image_id, _ in errors] == ["ISIC_bad"]


def _brute_force_pairs(fingerprints: list[ImageFingerprint], max_distance: int) -> pd.DataFrame:
    rows = []
    for i, first in enumerate(fingerprints):
        for second in fingerprints[i + 1 :]:
            a, b = sorted((first, second), key=lambda fp: fp.image_id)
            if first.sha1 == second.sha1:
                rows.append((a.image_id, b.image_id, "exact", 0))
            else:
                distance = bin(first.phash ^ second.phash).count("1")
                if distance <= max_distance:
                    rows.append((a.image_id, b.image_id, "near", distance))
    rows.sort()
    return pd.DataFrame(rows, columns=["image_id_a", "image_id_b", "kind", "distance"])


def _random_fingerprints(seed: int) -> list[ImageFingerprint]:
    """~300 random hashes plus planted copies 0-4 bits away (copies of copies reach 8) and exact copies."""
    rng = np.random.default_rng(seed)
    hashes = [int(h) for h in rng.integers(0, 2**64, size=240, dtype=np.uint64)]
    for _ in range(60):
        source = hashes[int(rng.integers(len(hashes)))]
        flips = rng.choice(64, size=int(rng.integers(0, 5)), replace=False)
        hashes.append(source ^ sum(1 << int(bit) for bit in flips))
    sha1s = [f"sha{i}" for i in range(len(hashes))]
    for _ in range(5):
        source = int(rng.integers(len(hashes)))
        hashes.append(hashes[source])
        sha1s.append(sha1s[source])
    ids = [f"ISIC_{k:04d}" for k in rng.permutation(len(hashes))]
    return [ImageFingerprint(image_id=i, sha1=s, phash=h) for i, s, h in zip(ids, sha1s, hashes)]


@pytest.mark.parametrize("max_distance", [0, 2, 4, 6])
def test_pigeonhole_search_matches_brute_force(max_distance: int) -> None:
    fingerprints = _random_fingerprints(seed=max_distance)
    expected = _brute_force_pairs(fingerprints, max_distance)
    got = find_duplicate_pairs(fingerprints, max_distance=max_distance)
    assert (expected["kind"] == "exact").any() and (expected["kind"] == "near").any()
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_parallel_fingerprints_equal_the_sequential_ones_in_input_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metadata.duplicates as duplicates

    paths = [_save_jpeg(_smooth_image(seed), tmp_path / f"{seed}.jpg") for seed in range(12)]
    ids = [f"ISIC_{seed}" for seed in range(12)]
    sequential, _ = fingerprint_images(ids, paths, workers=1)
    monkeypatch.setattr(duplicates, "PARALLEL_ABOVE", 4)
    monkeypatch.setattr(duplicates, "FINGERPRINT_CHUNK", 5)  # three tasks on two processes
    parallel, _ = fingerprint_images(ids, paths, workers=2)
    assert parallel == sequential and [fp.image_id for fp in parallel] == ids
