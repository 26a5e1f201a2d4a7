"""The synthetic generator and the annotation validator (image and text records)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from conftest import REPO
from lowrank_core.data import (SPLITS, DatasetConfig, SyntheticSpec, generate_synthetic, load_mask,
                               prepare_dataset, validate_dataset)
from lowrank_core.errors import DataError

SMALL = SyntheticSpec(train=8, val=4, test=4, image_size=32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(synthetic, tmp_path):
    generate_synthetic(tmp_path / "again", SMALL)
    generate_synthetic(tmp_path / "other", SyntheticSpec(**{**SMALL.to_dict(), "seed": 1}))
    assert _files(synthetic) == _files(tmp_path / "again")
    assert _files(synthetic) != _files(tmp_path / "other")


def test_masks_agree_with_labels(synthetic):
    manifest = validate_dataset({split: synthetic / f"{split}.json" for split in SPLITS})
    methods = set()
    for split in SPLITS:
        records = json.loads((synthetic / f"{split}.json").read_text())
        methods |= {r["method"] for r in records}
        info = manifest["splits"][split]
        assert info["count"] == getattr(SMALL, split) and info["tampered"] == info["real"]
        for record in info["records"]:
            mask = load_mask(record["mask_path"], SMALL.image_size)
            if record["label"] == 0:
                assert record["mask_path"] == "32x32" and mask.sum() == 0
            else:
                assert record["mask_path"].endswith(".png") and 0.03 < mask.mean() < 0.4  # region_mask: 10-40%
                tampered = np.asarray(Image.open(record["image_path"]), dtype=np.float32)
                inside = tampered[mask > 0.5]
                outside = tampered[mask < 0.5]
                # the forensic cue: the tampered region's local noise differs from the rest of the image
                assert np.abs(np.diff(inside, axis=0)).mean() != pytest.approx(np.abs(np.diff(outside, axis=0)).mean(),
                                                                                rel=0.1)
    assert methods <= {"real", "splice", "copy_move"} and {"splice", "copy_move"} <= methods


def _grain(path: Path) -> float:
    """Mean absolute difference of vertically adjacent pixels: what sensor noise adds."""
    return float(np.abs(np.diff(np.asarray(Image.open(path), dtype=np.float32), axis=0)).mean())


def _region_grain(path: Path, mask_path: Path, inside: bool) -> float:
    """`_grain` over the pixel pairs that lie both inside (or both outside) the tampered region."""
    pixels = np.asarray(Image.open(path), dtype=np.float32)
    mask = np.asarray(Image.open(mask_path)) > 127
    pairs = (mask[1:] & mask[:-1]) if inside else (~mask[1:] & ~mask[:-1])
    return float(np.abs(np.diff(pixels, axis=0))[pairs].mean())


def test_camera_noise_sets_every_images_grain_and_the_region_sits_a_gap_away(tmp_path):
    """`camera_noise` is the grain of real and tampered images alike; a tampered region's is `region_noise_gap` away:
    noisier than a clean image's rest, and cleaner than a grainy one's in some images."""
    records = {}
    for noise in (3.0, 24.0):
        root = tmp_path / str(noise)
        generate_synthetic(root, SyntheticSpec(**{**SMALL.to_dict(), "train": 12, "camera_noise": (noise, noise)}))
        records[noise] = [{**r, "image_path": root / r["image_path"], "mask_path": root / r["mask_path"]}
                          for r in json.loads((root / "train.json").read_text())]
    real = {noise: [_grain(r["image_path"]) for r in records[noise] if r["label"] == 0] for noise in records}
    assert min(real[24.0]) > 2 * max(real[3.0])
    for noise, sign in ((3.0, [1]), (24.0, [-1, 1])):
        tampered = [r for r in records[noise] if r["label"] == 1]
        rest = [_region_grain(r["image_path"], r["mask_path"], inside=False) for r in tampered]
        region = [_region_grain(r["image_path"], r["mask_path"], inside=True) for r in tampered]
        assert max(rest) < 1.5 * min(real[noise]) and min(rest) > 0.67 * max(real[noise])  # the image's own grain
        assert sorted({int(np.sign(b - a)) for a, b in zip(rest, region)}) == sign
        assert all(abs(b - a) > 0.3 * a for a, b in zip(rest, region))


def test_the_grain_level_alone_does_not_separate_the_default_classes(tmp_path):
    """A classifier that sees nothing of an image but its grain level (`_grain`), fit on the embedded default's
    training split, scores its test split below 0.75: a detector has to find where the grain changes, not how much
    there is (on the decoy data this replaced, 1.0)."""
    default = yaml.safe_load((REPO / "config/config.yaml").read_text())["dataset"]["synthetic"]
    generate_synthetic(tmp_path, SyntheticSpec.from_dict(default))
    grain, labels = {}, {}
    for split in ("train", "test"):
        records = json.loads((tmp_path / f"{split}.json").read_text())
        grain[split] = [[_grain(tmp_path / r["image_path"])] for r in records]
        labels[split] = [r["label"] for r in records]
    classifier = GradientBoostingClassifier(max_depth=2, random_state=0).fit(grain["train"], labels["train"])
    score = roc_auc_score(labels["test"], classifier.predict_proba(grain["test"])[:, 1])
    print(f"grain level alone: test ROC-AUC {score:.3f}")
    assert score < 0.75


def _write_split_files(root: Path, records_by_split: dict[str, list]) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps(records_by_split[split]))
    return files


@pytest.fixture
def user_dataset(tmp_path):
    """A valid user dataset: one real and one tampered image per split, with PNG masks."""
    (tmp_path / "img").mkdir()
    records = {}
    for split in SPLITS:
        records[split] = []
        for label in (0, 1):
            name = f"img/{split}_{label}.png"
            Image.new("RGB", (20, 16), (label * 200, 50, 50)).save(tmp_path / name)
            record = {"image_path": name, "label": label, "mask_path": "16x20"}
            if label:
                Image.new("L", (20, 16), 255).save(tmp_path / f"img/{split}_mask.png")
                record["mask_path"] = f"img/{split}_mask.png"
            records[split].append(record)
    return tmp_path, records


def test_valid_user_dataset_gives_manifest(user_dataset):
    root, records = user_dataset
    manifest = validate_dataset(_write_split_files(root, records))
    assert manifest["warnings"] == []
    record = manifest["splits"]["train"]["records"][1]
    assert Path(record["image_path"]).is_absolute() and (record["height"], record["width"]) == (16, 20)


def test_tampered_image_without_mask_is_a_warning(user_dataset):
    root, records = user_dataset
    records["val"][1]["mask_path"] = None
    manifest = validate_dataset(_write_split_files(root, records))
    assert len(manifest["warnings"]) == 1 and "val.json: record 1" in manifest["warnings"][0]
    assert manifest["splits"]["val"]["records"][1]["mask_path"] is None
    assert manifest["splits"]["val"]["with_mask"] == 1


def _corrupt(root, records, case):
    train = records["train"]
    if case == "label":
        train[0]["label"] = 2
    elif case == "missing_image":
        train[0]["image_path"] = "img/nowhere.png"
    elif case == "unreadable_image":
        (root / "img/broken.png").write_text("not a png")
        train[0]["image_path"] = "img/broken.png"
    elif case == "mask_size":
        Image.new("L", (8, 8)).save(root / "img/small_mask.png")
        train[1]["mask_path"] = "img/small_mask.png"
    elif case == "zero_mask_size":
        train[0]["mask_path"] = "20x16"
    elif case == "malformed_zero_mask":
        train[0]["mask_path"] = "16by20"
    elif case == "missing_mask":
        train[1]["mask_path"] = "img/nowhere_mask.png"
    elif case == "empty_split":
        records["test"] = []
    elif case == "duplicate":
        train.append(dict(train[0]))
    elif case == "duplicate_across_splits":
        records["val"].append(dict(train[0]))
    elif case == "not_a_list":
        records["train"] = {"image_path": "x"}
    elif case == "not_a_record":
        train.append("img/train_0.png")


@pytest.mark.parametrize(
    "case, message",
    [
        ("label", r"train\.json: record 0: 'label' must be 0 \(real\) or 1 \(tampered\), got 2"),
        ("missing_image", r"train\.json: record 0: image .*nowhere\.png does not exist"),
        ("unreadable_image", r"train\.json: record 0: image .*broken\.png is unreadable"),
        ("mask_size", r"train\.json: record 1: mask .*small_mask\.png size does not match"),
        ("zero_mask_size", r"train\.json: record 0: mask size 20x16 does not match image size 16x20"),
        ("malformed_zero_mask", r"train\.json: record 0: 'mask_path' '16by20' is neither \"HxW\" nor an existing file"),
        ("missing_mask", r"train\.json: record 1: 'mask_path' 'img/nowhere_mask\.png' is neither \"HxW\" nor an "
                         r"existing file \(.*nowhere_mask\.png\)"),
        ("empty_split", r"test\.json: split 'test' is empty"),
        ("duplicate", r"train\.json: image .*train_0\.png is listed twice"),
        ("duplicate_across_splits", r"val\.json: image .*train_0\.png is listed twice \(also in split 'train'\)"),
        ("not_a_list", r"train\.json: must hold a JSON list of records, got dict"),
        ("not_a_record", r"train\.json: record 2: must be an object, got str"),
    ],
)
def test_each_bad_case_has_its_own_error(user_dataset, case, message):
    root, records = user_dataset
    _corrupt(root, records, case)
    with pytest.raises(DataError, match=message) as caught:
        validate_dataset(_write_split_files(root, records))
    assert "\n" not in str(caught.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"train\.json: annotation file does not exist"):
        validate_dataset({split: tmp_path / f"{split}.json" for split in SPLITS})


@pytest.fixture
def text_dataset(tmp_path):
    """A valid text dataset: one real and one tampered passage per split (multi-line, with an extra key)."""
    return tmp_path, {split: [{"text": f"A {split} passage.\nIt reads plainly.", "label": 0},
                              {"text": f"A {split} passage, doctored.", "label": 1, "source": "wiki"}]
                      for split in SPLITS}


def test_valid_text_dataset_gives_manifest(text_dataset):
    root, records = text_dataset
    manifest = validate_dataset(_write_split_files(root, records), "text")
    assert manifest["warnings"] == []
    for split in SPLITS:
        info = manifest["splits"][split]
        assert (info["count"], info["real"], info["tampered"], info["with_mask"]) == (2, 1, 1, 0)
        assert info["records"] == [{"text": r["text"], "label": r["label"]} for r in records[split]]


def test_prepare_dataset_records_the_modality(text_dataset, tmp_path):
    root, records = text_dataset
    _write_split_files(root, records)
    prepare_dataset(DatasetConfig(source=str(root)), None, tmp_path / "manifest.json", "text")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["modality"] == "text" and manifest["source"] == str(root)
    assert manifest["splits"]["test"]["records"][0]["text"] == records["test"][0]["text"]


def test_synthetic_images_are_refused_for_a_text_model(synthetic, tmp_path):
    with pytest.raises(DataError, match=r"^dataset\.source: the synthetic dataset is images, but model\.modality is "
                                        r"text: point dataset\.source at a directory of \{\"text\""):
        prepare_dataset(DatasetConfig(), synthetic, tmp_path / "manifest.json", "text")
    assert not (tmp_path / "manifest.json").exists()


def _corrupt_text(records, case):
    train = records["train"]
    long_text = "Line one of a long passage.\n" * 5
    if case == "image_record":
        train[0] = {"image_path": "img/train_0.png", "label": 0, "mask_path": "16x20"}
    elif case == "empty_text":
        train[1]["text"] = ""
    elif case == "blank_text":
        train[1]["text"] = " \n\t"
    elif case == "number_text":
        train[0]["text"] = 7
    elif case == "missing_text":
        del train[0]["text"]
    elif case == "label":
        train[0]["label"] = "1"
    elif case == "duplicate":
        train.append(dict(train[0]))
    elif case == "duplicate_across_splits":
        records["test"].append(dict(train[1]))
    elif case == "long_duplicate":
        train[0]["text"] = train[1]["text"] = long_text
    elif case == "empty_split":
        records["val"] = []
    elif case == "not_a_record":
        train.append("a bare string")


@pytest.mark.parametrize(
    "case, message",
    [
        ("image_record", r"train\.json: record 0: has 'image_path' but no 'text': model\.modality is text, "
                         r"whose records are \{\"text\": \.\.\., \"label\": 0\|1\}$"),
        ("empty_text", r"train\.json: record 1: 'text' must be a non-empty string, got ''$"),
        ("blank_text", r"train\.json: record 1: 'text' must be a non-empty string, got ' \\n\\t'$"),
        ("number_text", r"train\.json: record 0: 'text' must be a non-empty string, got 7$"),
        ("missing_text", r"train\.json: record 0: 'text' must be a non-empty string, got None$"),
        ("label", r"train\.json: record 0: 'label' must be 0 \(real\) or 1 \(tampered\), got '1'$"),
        ("duplicate", r"train\.json: text 'A train passage\.\\nIt reads plainly\.' is listed twice "
                      r"\(also in split 'train'\)$"),
        ("duplicate_across_splits", r"test\.json: text 'A train passage, doctored\.' is listed twice "
                                    r"\(also in split 'train'\)$"),
        ("long_duplicate", r"train\.json: text 'Line one of a long passage\.\\nLine one of a long passage\.\\n"
                           r"L\.\.\.' is listed twice"),
        ("empty_split", r"val\.json: split 'val' is empty$"),
        ("not_a_record", r"train\.json: record 2: must be an object, got str$"),
    ],
)
def test_each_bad_text_case_has_its_own_error(text_dataset, case, message):
    root, records = text_dataset
    _corrupt_text(records, case)
    with pytest.raises(DataError, match=message) as caught:
        validate_dataset(_write_split_files(root, records), "text")
    assert "\n" not in str(caught.value)


def test_mixed_kinds_name_the_first_record_of_the_wrong_kind(user_dataset, text_dataset):
    root, image_records = user_dataset
    _, text_records = text_dataset
    mixed = {"train": text_records["train"], "val": text_records["val"] + image_records["val"],
             "test": text_records["test"]}
    with pytest.raises(DataError, match=r"val\.json: record 2: has 'image_path' but no 'text'"):
        validate_dataset(_write_split_files(root, mixed), "text")
    mixed = {**image_records, "test": image_records["test"] + text_records["test"]}
    with pytest.raises(DataError, match=r"test\.json: record 2: has 'text' but no 'image_path': model\.modality is "
                                        r"vision_language, whose records are \{\"image_path\": "):
        validate_dataset(_write_split_files(root, mixed))


def test_extra_keys_of_the_other_kind_are_ignored(user_dataset):
    """An image record may carry a 'text' (a caption): it is still an image record."""
    root, records = user_dataset
    records["train"][0]["text"] = "a caption"
    manifest = validate_dataset(_write_split_files(root, records))
    assert "text" not in manifest["splits"]["train"]["records"][0]
