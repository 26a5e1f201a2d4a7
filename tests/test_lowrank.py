"""Low-rank projection nets vs per-sample SVD: learning, the Eckart–Young bound, plateaus, resume, continuation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lowrank_core import lowrank
from lowrank_core.errors import CheckpointError, ConfigError, DataError
from lowrank_core.io import load_tensors, save_tensors
from lowrank_core.lowrank import (ARCHS, CURVE_NAME, HISTORY_NAME, STATE_NAME, WEIGHTS_NAME, LowrankConfig,
                                  compare_with_svd, load_projection, reconstruction_errors, svd_reconstruct,
                                  train_projection)

T, C, RANK, GRID = 16, 12, 4, (4, 4)
# Small nets and a short AdaLoRA schedule: 48 / 8 = 6 steps per epoch, 240 steps in 40 epochs.
BASE = {"rank": RANK, "row_hidden": [32], "col_hidden": [32], "dropout": 0.0, "lr": 3e-3, "epochs": 40,
        "allocator_init_warmup": 30, "allocator_final_warmup": 60, "allocator_mask_interval": 6,
        "allocator_keep_ratio": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _features(n: int, seed: int) -> torch.Tensor:
    """Rank-4-ish features: shared token and channel bases, per-sample strengths and token jitter, small noise."""
    fixed = torch.Generator().manual_seed(99)
    tokens = torch.linalg.qr(torch.randn(T, RANK, generator=fixed))[0]
    channels = torch.linalg.qr(torch.randn(C, RANK, generator=fixed))[0]
    g = torch.Generator().manual_seed(seed)
    u = tokens + 0.1 * torch.randn(n, T, RANK, generator=g)
    strength = torch.tensor([8.0, 6.0, 4.0, 2.0]) * (1 + 0.3 * torch.rand(n, 1, RANK, generator=g))
    return (u * strength) @ channels.T + 0.05 * torch.randn(n, T, C, generator=g)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    paths = {}
    for split, n, seed in (("train", 48, 0), ("val", 16, 1), ("test", 16, 2)):
        paths[split] = root / f"{split}.safetensors"
        save_tensors(paths[split], {"features": _features(n, seed)}, {"grid_h": GRID[0], "grid_w": GRID[1]})
    return paths


def _train(arch, data, root, seed=0, **overrides):
    return train_projection(arch, data["train"], data["val"], {**BASE, **overrides}, root / "out", root / "state",
                            seed=seed, device="cpu")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Each arch trained once with the BASE config: {arch: (summary, root)}."""
    runs = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        runs[arch] = (_train(arch, data, root), root)
    return runs


class EpochSpy:
    """Stands in for `_train_one_epoch`: counts calls, records the weights each starts from, can die at a call."""

    def __init__(self, die_at: int | None = None):
        self.calls, self.start_weights, self.die_at = 0, [], die_at
        self.real = lowrank._train_one_epoch

    def __call__(self, model, *args, **kwargs):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt("killed")
        self.start_weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return self.real(model, *args, **kwargs)


def _spy(monkeypatch, die_at=None) -> EpochSpy:
    spy = EpochSpy(die_at)
    monkeypatch.setattr(lowrank, "_train_one_epoch", spy)
    return spy


def _outputs(root):
    history = json.loads((root / "out" / HISTORY_NAME).read_text())
    for record in history["epochs"]:
        record.pop("seconds")
    return load_tensors(root / "out" / WEIGHTS_NAME)[0], history


def _assert_same_run(root_a, root_b):
    weights_a, history_a = _outputs(root_a)
    weights_b, history_b = _outputs(root_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6)
    assert len(history_a["epochs"]) == len(history_b["epochs"])
    for record_a, record_b in zip(history_a["epochs"], history_b["epochs"]):
        assert record_a == pytest.approx(record_b, rel=1e-5)
    assert history_a["best_epoch"] == history_b["best_epoch"]
    assert history_a["stop_reason"] == history_b["stop_reason"]


# ---------------------------------------------------------------- config and bad input


def test_config_defaults_are_the_originals():
    cfg = LowrankConfig.from_dict({})
    assert (cfg.batch_size, cfg.lr, cfg.rank, cfg.lambda_b, cfg.lambda_ortho, cfg.weight_decay, cfg.patience) == \
        (8, 1e-4, 128, 1e-4, 1e-3, 1e-5, 10)
    assert cfg.archs == ARCHS and cfg.extra_epochs == 0


@pytest.mark.parametrize("entry, key", [({"archs": ["ResMLP", "Transformer"]}, "lowrank.archs"),
                                        ({"allocator_keep_ratio": 0.0}, "lowrank.allocator_keep_ratio"),
                                        ({"row_hidden": [0]}, "lowrank.row_hidden"),
                                        ({"extra_epochs": -1}, "lowrank.extra_epochs"),
                                        ({"lr": "fast"}, "lowrank.lr")])
def test_bad_config_values_name_their_key(entry, key):
    with pytest.raises(ConfigError, match=key):
        LowrankConfig.from_dict(entry)


def test_unknown_arch_fails_cleanly(data, tmp_path):
    with pytest.raises(ConfigError, match=r"lowrank\.archs: unknown arch 'Transformer'"):
        _train("Transformer", data, tmp_path)
    with pytest.raises(ConfigError, match=r"lowrank\.archs"):
        compare_with_svd("resmlp", tmp_path, data["test"], BASE, tmp_path / "c.json", tmp_path / "c.png")
    assert not any(tmp_path.iterdir())


def test_bad_features_and_rank_fail_cleanly(data, tmp_path):
    with pytest.raises(DataError, match="missing.safetensors"):
        train_projection("MLP", tmp_path / "missing.safetensors", data["val"], BASE, tmp_path / "o", tmp_path / "s")
    save_tensors(tmp_path / "flat.safetensors", {"features": torch.zeros(4, 12)})
    with pytest.raises(DataError, match=r"flat.safetensors: expected a non-empty tensor 'features' \[N, T, C\]"):
        train_projection("MLP", data["train"], tmp_path / "flat.safetensors", BASE, tmp_path / "o", tmp_path / "s")
    with pytest.raises(ConfigError, match=r"lowrank\.rank: 13 exceeds min\(T, C\) = 12"):
        _train("MLP", data, tmp_path, rank=13)
    with pytest.raises(ConfigError, match=r"lowrank\.allocator_init_warmup: .* no budgeting phase"):
        _train("AdaLoRA", data, tmp_path, epochs=2)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- SVD baseline


def test_svd_baseline_matches_numpy():
    x = _features(5, seed=3)
    for rank in (1, 2, RANK):
        expected = []
        for sample in x.double().numpy():
            u, s, vh = np.linalg.svd(sample, full_matrices=False)
            expected.append((u[:, :rank] * s[:rank]) @ vh[:rank])
        np.testing.assert_allclose(svd_reconstruct(x, rank).numpy(), np.stack(expected), rtol=1e-4, atol=1e-4)
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    energy = (s[:, :2] ** 2).sum(1) / (s ** 2).sum(1)
    errors = reconstruction_errors(x, svd_reconstruct(x, 2))
    np.testing.assert_allclose(errors["energy_captured"].numpy(), energy, rtol=1e-4)
    np.testing.assert_allclose(errors["rel_frobenius"].numpy() ** 2, 1 - energy, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- training and comparison


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_learns_and_writes_its_outputs(trained, arch):
    summary, root = trained[arch]
    assert summary["best_val_mse"] < 0.25 * summary["initial_val_mse"]
    history = json.loads((root / "out" / HISTORY_NAME).read_text())
    assert [r["epoch"] for r in history["epochs"]] == list(range(1, history["epochs_run"] + 1))
    assert history["epochs"][history["best_epoch"] - 1]["val_mse"] == history["best_val_mse"]
    assert {"train_mse", "val_mse", "lr", "effective_rank"} <= history["epochs"][0].keys()
    assert (root / "out" / CURVE_NAME).read_bytes()[:4] == b"\x89PNG"
    weights, meta = load_tensors(root / "out" / WEIGHTS_NAME)
    assert (meta["arch"], meta["num_tokens"], meta["channels"]) == (arch, T, C)
    assert (root / "state" / STATE_NAME).is_file() and not (root / "out" / STATE_NAME).exists()


def test_adalora_masks_its_rank_gate_down_to_the_kept_ratio(trained):
    summary, root = trained["AdaLoRA"]
    history = json.loads((root / "out" / HISTORY_NAME).read_text())
    ranks = [r["effective_rank"] for r in history["epochs"]]
    assert ranks[0] == RANK and ranks[-1] == summary["effective_rank"] == RANK // 2
    model, _ = load_projection("AdaLoRA", root / "out", LowrankConfig.from_dict(BASE))
    assert model.effective_rank_mask().tolist().count(True) == model.current_effective_rank() == RANK // 2
    _, a, _ = model(_features(2, seed=5))
    masked = ~model.effective_rank_mask()
    assert torch.all(a[..., masked] == 0) and torch.all(a[..., ~masked].abs().sum(1) > 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_network_beats_the_svd_at_its_rank(trained, data, arch):
    _, root = trained[arch]
    result = compare_with_svd(arch, root / "out", data["test"], BASE, root / "cmp.json", root / "cmp.png",
                              image_index=3, device="cpu")
    assert json.loads((root / "cmp.json").read_text()) == result
    assert (root / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert result["svd_rank"] == result["effective_rank"] <= RANK
    assert result["network"]["mse"] >= result["svd"]["mse"] and result["ratio"]["mse"] >= 1.0
    assert result["svd"]["seconds_per_sample"] > 0 and result["network"]["seconds_per_sample"] > 0
    # per sample, not only on average: X̂ = A·B has rank ≤ r, so it cannot beat the truncated SVD (Eckart–Young)
    test = load_tensors(data["test"])[0]["features"]
    model, _ = load_projection(arch, root / "out", LowrankConfig.from_dict(BASE))
    net = reconstruction_errors(test, lowrank.reconstruct(model, test, 8))["mse"]
    svd = reconstruction_errors(test, svd_reconstruct(test, result["effective_rank"]))["mse"]
    assert torch.all(net >= svd * (1 - 1e-5))
    assert net.mean().item() == pytest.approx(result["network"]["mse"], rel=1e-5)


def test_comparison_rejects_weights_of_another_config(trained, data, tmp_path):
    _, root = trained["MLP"]
    with pytest.raises(CheckpointError, match="does not match the lowrank config"):
        compare_with_svd("MLP", root / "out", data["test"], {**BASE, "row_hidden": [16]}, tmp_path / "c.json",
                         tmp_path / "c.png")
    with pytest.raises(CheckpointError, match="holds a 'MLP' net, not 'ResMLP'"):
        compare_with_svd("ResMLP", root / "out" / WEIGHTS_NAME, data["test"], BASE, tmp_path / "c.json",
                         tmp_path / "c.png")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- plateau, resume, continuation

PLATEAU = {"lr": 1e-7, "patience": 4, "lr_patience": 1, "epochs": 30}


def test_plateau_reduces_the_lr_and_stops_early(data, tmp_path):
    summary = _train("MLP", data, tmp_path, **PLATEAU)
    history = json.loads((tmp_path / "out" / HISTORY_NAME).read_text())
    lrs = [r["lr"] for r in history["epochs"]]
    assert summary["stop_reason"] == "early_stopping"
    assert summary["best_epoch"] == 1 and summary["epochs_run"] == 1 + PLATEAU["patience"]
    assert lrs[0] == PLATEAU["lr"] and lrs[-1] < lrs[0]


@pytest.mark.parametrize("arch", ["MLP", "ResMLP"])
def test_more_epochs_resume_from_the_stored_state(arch, data, tmp_path, monkeypatch):
    # dropout: the resumed run must continue the same random stream. min_improvement 0.9: no epoch after the first
    # counts as an improvement, so the plateau scheduler halves the lr every other epoch, across the split too.
    settings = {"dropout": 0.1, "epochs": 7, "min_improvement": 0.9, "lr_patience": 1}
    _train(arch, data, tmp_path / "whole", seed=1, **settings)
    _train(arch, data, tmp_path / "parts", seed=1, **{**settings, "epochs": 3})
    spy = _spy(monkeypatch)
    _train(arch, data, tmp_path / "parts", seed=1, **settings)
    assert spy.calls == 4
    _assert_same_run(tmp_path / "whole", tmp_path / "parts")
    lrs = [r["lr"] for r in _outputs(tmp_path / "parts")[1]["epochs"]]
    assert lrs == pytest.approx([BASE["lr"]] * 3 + [BASE["lr"] / 2] * 2 + [BASE["lr"] / 4] * 2)


def test_killed_run_resumes_from_its_last_epoch(trained, data, tmp_path, monkeypatch):
    _, reference = trained["AdaLoRA"]  # the same config run without interruption
    _spy(monkeypatch, die_at=28)  # killed in epoch 28, while the rank gate's channels are being chosen
    with pytest.raises(KeyboardInterrupt):
        _train("AdaLoRA", data, tmp_path)
    assert (tmp_path / "state" / STATE_NAME).is_file() and not (tmp_path / "out").exists()
    spy = _spy(monkeypatch)
    _train("AdaLoRA", data, tmp_path)
    assert spy.calls == BASE["epochs"] - 27
    _assert_same_run(reference, tmp_path)


def test_extra_epochs_continue_from_the_best_state(data, tmp_path, monkeypatch):
    # min_improvement 0.5: only halving the val MSE counts, so the run stops early well after its best epoch
    settings = {"min_improvement": 0.5, "patience": 3, "epochs": 30}
    base = _train("MLP", data, tmp_path, **settings)
    assert base["stop_reason"] == "early_stopping"
    best_weights = load_tensors(tmp_path / "out" / WEIGHTS_NAME)[0]
    spy = _spy(monkeypatch)
    _train("MLP", data, tmp_path, **settings, extra_epochs=5)
    for name, value in best_weights.items():
        torch.testing.assert_close(spy.start_weights[0][name], value)
    history = json.loads((tmp_path / "out" / HISTORY_NAME).read_text())
    continuation = history["segments"][1]
    assert continuation["from_best_epoch"] == base["best_epoch"] and continuation["start_epoch"] == base["epochs_run"]
    assert history["epochs_run"] == base["epochs_run"] + spy.calls and 1 <= spy.calls <= 5
    assert history["epochs"][base["epochs_run"]]["lr"] == BASE["lr"]  # a fresh optimizer and scheduler

    again = _spy(monkeypatch)
    _train("MLP", data, tmp_path, **settings, extra_epochs=5)
    assert again.calls == 0
    assert json.loads((tmp_path / "out" / HISTORY_NAME).read_text())["epochs_run"] == history["epochs_run"]


def test_a_changed_config_starts_over(data, tmp_path, monkeypatch):
    _train("MLP", data, tmp_path, **PLATEAU)
    spy = _spy(monkeypatch)
    summary = _train("MLP", data, tmp_path, **{**PLATEAU, "lambda_b": 1e-3})
    assert spy.calls == summary["epochs_run"] == 1 + PLATEAU["patience"]
    shutil.rmtree(tmp_path / "out")
    spy = _spy(monkeypatch)
    _train("MLP", data, tmp_path, **{**PLATEAU, "lambda_b": 1e-3})
    assert spy.calls == 0 and (tmp_path / "out" / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_state_starts_over_with_a_warning(data, tmp_path, monkeypatch, caplog, damage):
    _train("MLP", data, tmp_path / "whole", **PLATEAU)
    _train("MLP", data, tmp_path / "damaged", **{**PLATEAU, "epochs": 2})
    state = tmp_path / "damaged" / "state" / STATE_NAME
    raw = bytearray(state.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF  # still a readable safetensors file: only the checksum can tell
    else:
        del raw[len(raw) // 2:]
    state.write_bytes(bytes(raw))
    spy = _spy(monkeypatch)
    _train("MLP", data, tmp_path / "damaged", **PLATEAU)
    assert "damaged training state" in caplog.text
    assert spy.calls == 1 + PLATEAU["patience"]  # every epoch again, from scratch
    _assert_same_run(tmp_path / "whole", tmp_path / "damaged")
