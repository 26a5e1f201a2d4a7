"""ΔW export: exact factors and energies, their a-posteriori accuracy check, streaming over single-file and sharded
checkpoints, bounded memory, module naming, and clean refusals of mismatched or missing checkpoints."""

import errno
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_core import delta as delta_module
from lowrank_core.delta import (
    Checkpoint,
    DeltaConfig,
    analyse_deltas,
    export_delta,
    factor_errors,
    lora_factors,
    may_rename,
    module_group,
    top_singular_triplets,
)
from lowrank_core.errors import CheckpointError, ConfigError
from lowrank_core.io import load_tensors, read_json
from lowrank_core.modalities.depth.models import TinyDepthSpec, tiny_depth_config
from lowrank_core.modeling import TINY_ARCHS, TinyModelSpec, tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def with_spectrum(m, n, sigma, seed=0):
    """A float64 [m, n] matrix whose singular values are `sigma` (random singular vectors)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.normal(size=(m, len(sigma))))[0]
    V = np.linalg.qr(rng.normal(size=(n, len(sigma))))[0]
    return (U * sigma) @ V.T


def write_checkpoint(directory, tensors, shards=1):
    """A `save_pretrained`-style checkpoint: `model.safetensors`, or `shards` files plus a hand-written index."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def toy_model(seed=0):
    """Weights named like a Qwen-VL state dict, with the tensors the exporter must skip."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.language_model.embed_tokens.weight": (50, 16),
        "model.language_model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.language_model.layers.0.self_attn.q_proj.bias": (16,),
        "model.language_model.layers.0.self_attn.k_proj.weight": (6, 16),
        "model.language_model.layers.0.mlp.up_proj.weight": (24, 16),
        "model.language_model.layers.1.mlp.down_proj.weight": (16, 24),
        "model.language_model.layers.1.input_layernorm.weight": (16,),
        "model.language_model.norm.weight": (16,),
        "model.visual.patch_embed.proj.weight": (16, 3, 2, 2),
        "model.visual.blocks.0.attn.qkv.weight": (48, 16),
        "model.visual.blocks.0.norm1.weight": (16,),
        "model.visual.merger.mlp.0.weight": (32, 32),
        "model.visual.merger.ln_q.weight": (16,),
        "lm_head.weight": (50, 16),
        "score_head.weight": (2, 16),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def fine_tuned(base, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


@pytest.fixture
def pair(tmp_path):
    base = toy_model()
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "teacher", fine_tuned(base))


@pytest.mark.parametrize("alpha", [None, 16.0])
@pytest.mark.parametrize("threshold", [1000, 0], ids=["exact", "gram"])
def test_factors_reconstruct_the_truncated_svd_of_numpy(tmp_path, alpha, threshold):
    delta = with_spectrum(96, 80, 0.7 ** np.arange(40))
    base = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    teacher = base + torch.tensor(delta, dtype=torch.float32)
    name = "model.language_model.layers.0.self_attn.o_proj"
    write_checkpoint(tmp_path / "base", {f"{name}.weight": base})
    write_checkpoint(tmp_path / "teacher", {f"{name}.weight": teacher})
    cfg = DeltaConfig(ranks=(4, 8), alpha=alpha, full_spectrum_threshold=threshold)
    result = export_delta(tmp_path / "base", tmp_path / "teacher", tmp_path / "out", cfg)

    assert result["modules"][0]["method"] == ("exact" if threshold else "gram")
    actual_delta = (teacher.double() - base.double()).numpy()
    U, S, Vh = np.linalg.svd(actual_delta)
    for r in (4, 8):
        factors, meta = load_tensors(tmp_path / "out" / f"factors_r{r}.safetensors")
        B, A = factors[f"{name}.lora_B"], factors[f"{name}.lora_A"]
        assert B.shape == (96, r) and A.shape == (r, 80)
        scaling = 1.0 if alpha is None else alpha / r
        assert meta["scaling"] == pytest.approx(scaling)
        expected = (U[:, :r] * S[:r]) @ Vh[:r]
        np.testing.assert_allclose((B.double() @ A.double()).numpy() * scaling, expected, atol=1e-5 * S[0])


def test_gram_energy_matches_a_known_spectrum():
    sigma = 1.0 / np.arange(1, 385)
    delta = torch.tensor(with_spectrum(512, 384, sigma), dtype=torch.float32)
    cfg = DeltaConfig(ranks=(4, 16, 64), full_spectrum_threshold=0)
    record = analyse_deltas([("m", delta, 1.0)], {"m": list(delta.shape)}, cfg).modules[0]

    assert record["method"] == "gram" and len(record["singular_values"]) == 64 + cfg.oversampling
    np.testing.assert_allclose(record["singular_values"][:16], sigma[:16], rtol=1e-4)
    for r in (4, 16, 64):
        exact = (sigma[:r] ** 2).sum() / (sigma ** 2).sum()
        assert record["energy"][str(r)] == pytest.approx(exact, abs=1e-4)
        assert record["rel_error"][str(r)] == pytest.approx(np.sqrt(1 - exact), abs=1e-3)


def test_reported_error_is_the_reconstruction_error_of_the_exported_factors():
    delta = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # flat spectrum
    cfg = DeltaConfig(ranks=(8, 32), full_spectrum_threshold=0, oversampling=2, alpha=8.0)
    analysis = analyse_deltas([("m", delta, 1.0)], {"m": list(delta.shape)}, cfg)
    record, (U, S, Vh) = analysis.modules[0], analysis.triplets["m"]
    exact = torch.linalg.svdvals(delta.double())
    for r in (8, 32):
        B, A = lora_factors(U, S, Vh, r, cfg.scaling(r))
        error = torch.linalg.norm(delta.double() - (B @ A).double() * cfg.scaling(r)) / torch.linalg.norm(delta)
        assert record["rel_error"][str(r)] == pytest.approx(float(error), abs=1e-4)
        optimal_energy = float((exact[:r] ** 2).sum() / (exact ** 2).sum())
        assert record["energy"][str(r)] <= optimal_energy + 1e-5


def test_exact_svd_keeps_the_full_spectrum_of_small_matrices():
    delta = torch.tensor(with_spectrum(40, 30, np.linspace(2, 1, 30)), dtype=torch.float32)
    U, S, Vh, spectrum, method = top_singular_triplets(delta, 8, DeltaConfig(full_spectrum_threshold=64))
    assert method == "exact" and spectrum.shape == (30,) and U.shape == (40, 8) and Vh.shape == (8, 30)
    np.testing.assert_allclose(spectrum.numpy(), np.linspace(2, 1, 30), rtol=1e-5)


def slow_decay(m, n, seed=0):
    """A float32 [m, n] ΔW with σ_i ∝ i^-0.5 plus Gaussian noise: the flat spectrum of a real fine-tune."""
    rng = np.random.default_rng(seed + 1)
    delta = with_spectrum(m, n, np.arange(1, min(m, n) + 1) ** -0.5, seed) + 0.05 * rng.normal(size=(m, n)) / n ** 0.5
    return torch.tensor(delta, dtype=torch.float32)


def numpy_truncations(delta, ranks):
    """r -> the exact ΔW_r of numpy.linalg.svd, in float64."""
    U, S, Vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return {r: (U[:, :r] * S[:r]) @ Vh[:r] for r in ranks}


def factor_error(triplets, rank, exact):
    """‖B A − ΔW_r‖_F / ‖ΔW_r‖_F of the exported (float32) rank-`rank` factors."""
    B, A = lora_factors(*triplets, rank, 1.0)
    return np.linalg.norm((B.double() @ A.double()).numpy() - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("shape", [(160, 400), (400, 160)], ids=["wide", "tall"])
def test_factors_of_a_slow_decay_matrix_match_numpy_within_the_recorded_error(shape):
    delta = slow_decay(*shape)
    cfg = DeltaConfig(ranks=(4, 16, 64), full_spectrum_threshold=0)
    analysis = analyse_deltas([("m", delta, 1.0)], {"m": list(shape)}, cfg)
    record = analysis.modules[0]

    assert record["method"] == "gram" and not record["fallback"]
    for r, exact in numpy_truncations(delta, cfg.ranks).items():
        error, recorded = factor_error(analysis.triplets["m"], r, exact), record["factor_rel_error"][str(r)]
        assert error <= recorded <= 1e-3 and recorded < 30 * error


def perturbed_basis(delta, eps, seed=0):
    """A stand-in for `_gram_basis`: the exact top-q singular basis of the shorter side, `eps` off."""
    U, _, Vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    exact = U if delta.shape[0] <= delta.shape[1] else Vh.T

    def basis(matrix, q):
        noise = np.random.default_rng(seed).normal(size=(exact.shape[0], q))
        return torch.linalg.qr(torch.tensor(exact[:, :q] + eps * noise)).Q
    return basis


@pytest.mark.parametrize("shape", [(120, 300), (300, 120)], ids=["wide", "tall"])
def test_the_recorded_error_tracks_the_true_error_of_inexact_factors(shape, monkeypatch):
    delta = slow_decay(*shape)
    cfg = DeltaConfig(ranks=(4, 16, 64), full_spectrum_threshold=0, factor_tolerance=None)
    truncations = numpy_truncations(delta, cfg.ranks)
    for eps in (1e-6, 1e-4, 1e-2):
        monkeypatch.setattr(delta_module, "_gram_basis", perturbed_basis(delta, eps))
        U, S, Vh, spectrum, method = top_singular_triplets(delta, 64, cfg)
        recorded = factor_errors(delta, U, S, Vh, cfg.ranks, float(spectrum[-1]))
        for r, exact in truncations.items():
            error = factor_error((U.float(), S.float(), Vh.float()), r, exact)
            assert error > eps and error <= recorded[r] <= 3 * error, (eps, r)


def test_factors_over_the_tolerance_fall_back_to_the_exact_svd(monkeypatch):
    delta = slow_decay(120, 300)
    monkeypatch.setattr(delta_module, "_gram_basis", perturbed_basis(delta, 1e-2))
    shapes = {"m": [120, 300]}
    recorded = analyse_deltas([("m", delta, 1.0)], shapes, DeltaConfig(ranks=(4, 16), full_spectrum_threshold=0,
                                                                        factor_tolerance=None)).modules[0]
    assert recorded["method"] == "gram" and not recorded["fallback"] and recorded["factor_rel_error"]["16"] > 1e-2

    analysis = analyse_deltas([("m", delta, 1.0)], shapes, DeltaConfig(ranks=(4, 16), full_spectrum_threshold=0))
    record = analysis.modules[0]
    assert record["method"] == "exact" and record["fallback"] and len(record["singular_values"]) == 120
    for r, exact in numpy_truncations(delta, (4, 16)).items():
        assert factor_error(analysis.triplets["m"], r, exact) <= record["factor_rel_error"][str(r)] < 1e-5


def test_degenerate_rank_deficient_and_zero_deltas():
    """Equal singular values through the subspace leave the gram factors uncertifiable (c = σ_k): exact SVD instead;
    a rank-2 ΔW keeps its gram factors (exact); a zero ΔW has no error to report."""
    orthogonal = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0))).Q
    rank_two = orthogonal[:, :2] @ orthogonal[:2]
    cfg = DeltaConfig(ranks=(4, 8), full_spectrum_threshold=0, oversampling=2)
    deltas = {"flat": orthogonal, "rank_two": rank_two, "zero": torch.zeros(64, 64)}
    analysis = analyse_deltas(((n, d, 1.0) for n, d in deltas.items()), {n: [64, 64] for n in deltas}, cfg)
    flat, low, zero = analysis.modules
    assert (flat["method"], flat["fallback"]) == ("exact", True) and flat["factor_rel_error"]["8"] < 1e-5
    assert (low["method"], low["fallback"]) == ("gram", False) and low["factor_rel_error"]["8"] < 1e-5
    assert zero["factor_rel_error"] == {"4": None, "8": None} and not zero["fallback"]
    B, A = lora_factors(*analysis.triplets["rank_two"], 8, 1.0)
    torch.testing.assert_close(B @ A, rank_two, atol=1e-6, rtol=0)


def test_export_selects_linear_weights_and_writes_every_output(pair, tmp_path):
    cfg = DeltaConfig(ranks=(4, 8))
    result = export_delta(*pair, tmp_path / "out", cfg)

    names = [m["name"] for m in result["modules"]]
    assert names == [
        "lm_head",
        "model.language_model.layers.0.mlp.up_proj",
        "model.language_model.layers.0.self_attn.k_proj",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.mlp.down_proj",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.merger.mlp.0",
    ]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "energy_vs_rank.png", "factors_r4.safetensors", "factors_r8.safetensors", "spectrum.png",
        "svd_analysis.json", "svd_summary.txt"]
    for plot in ("spectrum.png", "energy_vs_rank.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_json(out / "svd_analysis.json")["modules"] == result["modules"]
    assert set(result["groups"]["by_tower"]) == {"language", "vision", "merger", "lm_head"}
    assert set(result["groups"]["by_layer"]) == {"language/0", "language/1", "vision/0"}
    assert result["groups"]["all"]["modules"] == 7
    assert "Energy captured" in (out / "svd_summary.txt").read_text()
    for module in result["modules"]:
        assert not module["fallback"] and set(module["factor_rel_error"]) == {"4", "8"}
        assert all(0 < error < 1e-5 for error in module["factor_rel_error"].values())
    assert result["factor_rel_error_max"] == max(e for m in result["modules"] for e in m["factor_rel_error"].values())
    assert f"max relative error against the exact ΔW_r (a posteriori) {result['factor_rel_error_max']:.2g} " \
           "(tolerance 0.001); SVD per module: 7 exact (0 exact after missing the tolerance)" in \
           (out / "svd_summary.txt").read_text()

    with safe_open(str(out / "factors_r8.safetensors"), "pt") as f:
        assert set(f.keys()) == {f"{n}.lora_{s}" for n in names for s in "AB"}
        k_proj = "model.language_model.layers.0.self_attn.k_proj"  # [6, 16]: rank 8 exceeds min(shape)
        B, A = f.get_tensor(f"{k_proj}.lora_B"), f.get_tensor(f"{k_proj}.lora_A")
    assert B.shape == (6, 8) and A.shape == (8, 16) and not B[:, 6:].any() and not A[6:].any()
    base_dir, teacher_dir = pair
    key = f"{k_proj}.weight"
    with safe_open(str(base_dir / "model.safetensors"), "pt") as fb, \
            safe_open(str(teacher_dir / "model.safetensors"), "pt") as ft:
        delta = ft.get_tensor(key) - fb.get_tensor(key)
    torch.testing.assert_close(B @ A, delta, atol=1e-5, rtol=1e-5)
    record = next(m for m in result["modules"] if m["name"] == k_proj)
    assert record["energy"]["8"] == pytest.approx(1.0) and record["rel_error"]["8"] == pytest.approx(0, abs=1e-3)


def test_unchanged_modules_have_no_energy_and_do_not_count_in_groups(tmp_path):
    """A teacher trained with a frozen vision tower: its ΔW is zero there."""
    base = toy_model()
    teacher = fine_tuned(base)
    teacher["model.visual.blocks.0.attn.qkv.weight"] = base["model.visual.blocks.0.attn.qkv.weight"]
    base_dir, teacher_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "teacher", teacher)
    result = export_delta(base_dir, teacher_dir, tmp_path / "out", DeltaConfig(ranks=(4,)))
    frozen = next(m for m in result["modules"] if m["name"] == "model.visual.blocks.0.attn.qkv")
    assert frozen["frobenius_norm"] == 0 and frozen["energy"] == {"4": None} and frozen["rel_error"] == {"4": None}
    assert result["groups"]["by_tower"]["vision"]["energy"] == {"4": None}
    assert 0 < result["groups"]["all"]["energy"]["4"] < 1
    factors, _ = load_tensors(tmp_path / "out" / "factors_r4.safetensors")
    assert not factors["model.visual.blocks.0.attn.qkv.lora_B"].any()


def test_include_regex_restricts_the_modules(pair, tmp_path):
    cfg = DeltaConfig(ranks=(4,), include=r"visual\.blocks")
    result = export_delta(*pair, tmp_path / "out", cfg)
    assert [m["name"] for m in result["modules"]] == ["model.visual.blocks.0.attn.qkv"]
    with pytest.raises(ConfigError, match=r"delta\.include: no linear weight"):
        export_delta(*pair, tmp_path / "none", DeltaConfig(include="nothing_matches"))


def test_module_groups():
    assert module_group("model.visual.blocks.3.attn.qkv") == {"tower": "vision", "kind": "attention", "layer": 3}
    assert module_group("model.visual.merger.mlp.0") == {"tower": "merger", "kind": "mlp", "layer": None}
    assert module_group("model.language_model.layers.12.mlp.down_proj") == {
        "tower": "language", "kind": "mlp", "layer": 12}
    assert module_group("model.layers.0.self_attn.q_proj") == {"tower": "language", "kind": "attention", "layer": 0}
    assert module_group("lm_head") == {"tower": "lm_head", "kind": "other", "layer": None}


def test_sharded_and_single_file_checkpoints_give_the_same_result(tmp_path):
    base, teacher = toy_model(), fine_tuned(toy_model())
    cfg = DeltaConfig(ranks=(4, 8), full_spectrum_threshold=0, oversampling=2)
    results = {}
    for layout, (base_shards, teacher_shards) in {"single": (1, 1), "sharded": (3, 2), "mixed": (1, 4)}.items():
        base_dir = write_checkpoint(tmp_path / layout / "base", base, base_shards)
        teacher_dir = write_checkpoint(tmp_path / layout / "teacher", teacher, teacher_shards)
        results[layout] = export_delta(base_dir, teacher_dir, tmp_path / layout / "out", cfg)
    assert (tmp_path / "sharded" / "base" / "model.safetensors.index.json").is_file()
    for layout in ("sharded", "mixed"):
        assert results[layout]["modules"] == results["single"]["modules"]
        single, _ = load_tensors(tmp_path / "single" / "out" / "factors_r8.safetensors")
        other, _ = load_tensors(tmp_path / layout / "out" / "factors_r8.safetensors")
        assert single.keys() == other.keys()
        for key in single:
            torch.testing.assert_close(other[key], single[key])


def test_legacy_qwen2_5_vl_layout_is_renamed_to_module_names(tmp_path):
    """transformers writes Qwen2.5-VL as `visual.*` / `model.layers.*`; the modules are `model.visual.*` /
    `model.language_model.layers.*`, and a legacy checkpoint pairs with one in module layout."""
    legacy = {"visual.blocks.0.attn.qkv.weight": torch.randn(12, 4), "model.layers.0.mlp.up_proj.weight":
              torch.randn(8, 4), "model.embed_tokens.weight": torch.randn(20, 4)}
    teacher_dir = write_checkpoint(tmp_path / "teacher", fine_tuned(legacy))
    (teacher_dir / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl"}))
    base = {"model.visual.blocks.0.attn.qkv.weight": legacy["visual.blocks.0.attn.qkv.weight"],
            "model.language_model.layers.0.mlp.up_proj.weight": legacy["model.layers.0.mlp.up_proj.weight"]}
    base_dir = write_checkpoint(tmp_path / "base", base)
    result = export_delta(base_dir, teacher_dir, tmp_path / "out", DeltaConfig(ranks=(2,)))
    assert [m["name"] for m in result["modules"]] == ["model.language_model.layers.0.mlp.up_proj",
                                                      "model.visual.blocks.0.attn.qkv"]
    factors, _ = load_tensors(tmp_path / "out" / "factors_r2.safetensors")
    assert "model.visual.blocks.0.attn.qkv.lora_A" in factors


class TinyVocab:
    """What `modeling.tiny_config` reads of a tokenizer: its size and its special tokens' ids."""

    def __init__(self):
        self.ids = {}

    def __len__(self):
        return 64

    def convert_tokens_to_ids(self, token):
        return self.ids.setdefault(token, len(self.ids))


def tiny_transformers_model(arch):
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64))
    if arch == "depth_anything":
        return transformers.DepthAnythingForDepthEstimation(tiny_depth_config(TinyDepthSpec()))
    return getattr(transformers, TINY_ARCHS[arch].model)(tiny_config(TinyModelSpec(arch=arch), TinyVocab()))


@pytest.mark.parametrize("arch, renamed", [("llama", False), ("qwen3_vl", False), ("qwen2_5_vl", True),
                                           ("depth_anything", True)])
def test_keys_get_transformers_renaming_built_only_where_it_may_rename(tmp_path, arch, renamed):
    """Qwen2.5-VL saves `visual.*` / `model.layers.*` and Depth Anything's DINOv2 `attention.attention.query`, not
    their module names; Llama and Qwen3-VL save their module names. `may_rename` spares building the model (and
    importing transformers) only where transformers' own renaming, from the model skeleton, renames nothing."""
    model = tiny_transformers_model(arch)
    model.save_pretrained(tmp_path)
    config = read_json(tmp_path / "config.json")
    checkpoint = Checkpoint(tmp_path)
    exact = delta_module._skeleton_renamer(tmp_path, config["architectures"][0])

    assert may_rename(config, checkpoint.files) == renamed
    assert checkpoint.keys == {exact(key): key for key in checkpoint.files}
    assert set(checkpoint.keys) <= set(model.state_dict())
    assert (checkpoint.keys.keys() != set(checkpoint.files)) == renamed
    if arch == "depth_anything":
        assert checkpoint.keys["backbone.encoder.layer.0.attention.q_proj.weight"] == \
            "backbone.encoder.layer.0.attention.attention.query.weight"


def test_may_rename_where_a_legacy_renaming_matches_or_the_model_type_is_unknown(tmp_path):
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert not may_rename(llama, ["model.layers.0.mlp.up_proj.weight"])
    assert may_rename(llama, ["model.language_model.model.layers.0.mlp.up_proj.weight"])
    assert may_rename({"architectures": ["NovelForCausalLM"], "model_type": "novel"}, ["model.layers.0.weight"])

    tiny_transformers_model("llama").save_pretrained(tmp_path)
    probe = "import sys; from lowrank_core.delta import Checkpoint; Checkpoint(sys.argv[1]); print('transformers' in " \
            "sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_mismatched_shapes_are_refused_naming_the_tensor_and_both_files(tmp_path):
    base = toy_model()
    teacher = fine_tuned(base)
    teacher["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(48, 20)
    base_dir = write_checkpoint(tmp_path / "base", base)
    teacher_dir = write_checkpoint(tmp_path / "teacher", teacher, shards=2)
    with pytest.raises(CheckpointError) as err:
        export_delta(base_dir, teacher_dir, tmp_path / "out", DeltaConfig())
    message = str(err.value)
    assert "model.visual.blocks.0.attn.qkv.weight" in message and "[48, 16]" in message and "[48, 20]" in message
    assert str(base_dir / "model.safetensors") in message and str(teacher_dir / "model-0000") in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_different_module_sets_are_refused(tmp_path):
    base = toy_model()
    teacher = fine_tuned(base)
    del teacher["model.language_model.layers.1.mlp.down_proj.weight"]
    teacher["model.language_model.layers.2.mlp.down_proj.weight"] = torch.randn(16, 24)
    base_dir, teacher_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "teacher", teacher)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight: in .*base.* but not in "
                                              r".*teacher.*model\.safetensors"):
        export_delta(base_dir, teacher_dir, tmp_path / "out", DeltaConfig())
    assert not (tmp_path / "out").exists()


def test_missing_checkpoints_are_refused(pair, tmp_path):
    base_dir, teacher_dir = pair
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no model\.safetensors or model\.safetensors\.index\.json"):
        export_delta(tmp_path / "empty", teacher_dir, tmp_path / "out", DeltaConfig())
    sharded = write_checkpoint(tmp_path / "sharded", toy_model(), shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: checkpoint file is missing"):
        export_delta(base_dir, sharded, tmp_path / "out", DeltaConfig())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, message", [
    ({"ranks": []}, r"delta\.ranks: must list at least one rank"),
    ({"ranks": [4, 0]}, r"delta\.ranks: every rank must be at least 1"),
    ({"ranks": [4, 4]}, r"delta\.ranks: must not repeat"),
    ({"ranks": ["8"]}, r"delta\.ranks\[0\]: expected int"),
    ({"include": "(unclosed"}, r"delta\.include: not a valid regular expression"),
    ({"alpha": 0}, r"delta\.alpha: must be positive"),
    ({"factor_tolerance": 0}, r"delta\.factor_tolerance: must be positive"),
    ({"power_iterations": 4}, r"delta\.power_iterations: unknown key"),
    ({"rank": 8}, r"delta\.rank: unknown key"),
])
def test_config_rejects_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        DeltaConfig.from_dict(data)


def test_config_from_plain_dict():
    cfg = DeltaConfig.from_dict({"ranks": [16, 4], "alpha": 32})
    assert cfg.ranks == (16, 4) and cfg.scaling(16) == 2.0 and DeltaConfig().scaling(8) == 1.0


MEMORY_PROBE = textwrap.dedent("""
    import json, re, sys
    import torch
    from lowrank_core.delta import DeltaConfig, export_delta

    def status_kib(field):  # VmHWM: peak RSS of this process image (ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as status:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", status.read(), re.M).group(1))

    torch.set_num_threads(1)
    warm_base, warm_teacher, base, teacher, out = sys.argv[1:]
    cfg = DeltaConfig(ranks=(4, 8))
    export_delta(warm_base, warm_teacher, out + "_warm", cfg)  # imports and first-call allocations
    resident_kib = status_kib("VmRSS")
    export_delta(base, teacher, out, cfg)
    print(json.dumps({"growth_mb": (status_kib("VmHWM") - resident_kib) / 1024}))
""")



def test_streaming_peak_memory_stays_far_below_the_checkpoint_size(tmp_path):
    side, count = 512, 128  # 128 weights of 1 MiB: 128 MiB per checkpoint, 256 MiB for the pair
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(count)]
    base = {n: torch.randn(side, side, generator=g) for n in names}
    write_checkpoint(tmp_path / "base", base, shards=3)
    write_checkpoint(tmp_path / "teacher", {n: w + 0.01 for n, w in base.items()}, shards=3)
    del base
    small = {"model.layers.0.mlp.up_proj.weight": torch.randn(32, 32, generator=g)}
    write_checkpoint(tmp_path / "warm_base", small)
    write_checkpoint(tmp_path / "warm_teacher", fine_tuned(small))
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *(str(tmp_path / d) for d in ("warm_base", "warm_teacher", "base",
                                                                           "teacher", "out"))],
        capture_output=True, text=True, timeout=300, check=True)
    growth_mb = json.loads(probe.stdout.strip().splitlines()[-1])["growth_mb"]
    checkpoint_mb = count * side * side * 4 / 2 ** 20
    assert growth_mb < checkpoint_mb / 3, f"peak RSS grew by {growth_mb:.0f} MiB for a {checkpoint_mb:.0f} MiB model"
    assert len(load_tensors(tmp_path / "out" / "factors_r8.safetensors")[0]) == 2 * count


def test_a_failed_write_leaves_no_half_written_output(pair, tmp_path, monkeypatch):
    """A full disk while the factors are written: no output directory, no temporary left behind."""
    base, teacher = pair
    calls = {"n": 0}
    write = delta_module.FactorFiles.write

    def disk_fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)

    monkeypatch.setattr(delta_module.FactorFiles, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        export_delta(base, teacher, tmp_path / "out", DeltaConfig(ranks=(2, 4)))
    assert list(tmp_path.glob("*out*")) == []
