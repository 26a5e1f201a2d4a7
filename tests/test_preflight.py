"""Everything the config decides fails when the workflow starts: one line naming the key, exit code 1, no job run."""

import re

import pytest

from conftest import REPORT, copy_workflow, snakemake, snakemake_many, write_yaml


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("preflight") / "workflow")


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory) -> dict:
    """Every case of CASES (on the default config) and DEPTH_CASES (on the depth example), each in its own clean copy
    of the workflow, run at once (they stop at start-up): (workdir, completed run) by edit."""
    runs = {}
    for key in [*(case for case, _ in CASES), *((DEPTH, case) for case, _ in DEPTH_CASES)]:
        root = tmp_path_factory.mktemp("case")
        configs = ["config/config.yaml", *([key[0]] if isinstance(key, tuple) else [])]
        edit = write_yaml(root / "edit.yaml", key[1] if isinstance(key, tuple) else key)
        runs[key] = (copy_workflow(root / "workflow"), (REPORT, "--configfile", *configs, str(edit)))
    results = snakemake_many(runs)
    return {key: (workdir, results[key]) for key, (workdir, _) in runs.items()}


CASES = [
    # a typo in a preset's module kinds, which would otherwise train on whatever else the strategy selects
    ("lora:\n  presets:\n    standard: {target_modules: [q_proj, foo_proj]}\n",
     r"ConfigError: lora\.presets\.standard\.target_modules: 'foo_proj' matches no module in the blocks "
     r"lora\.strategies\.later_half selects \(their kinds: .*\)"),
    # layer ranges: reversed, and outside the model
    ("lora:\n  strategies:\n    later_half: {language: '3-1'}\n",
     r"ConfigError: lora\.strategies\.later_half\.language: '3-1' is not all, none, a fraction range like 0\.5:1, "
     r"or an ascending index range like 12-23"),
    ("lora:\n  strategies:\n    all: {vision: [2, 9]}\n",
     r"ConfigError: lora\.strategies\.all\.vision: layer 9 is outside this model's 4 blocks \(0-3\)"),
    # an svd init whose rank ΔW is not exported at
    ("delta:\n  ranks: [2]\n",
     r"ConfigError: delta\.ranks: init svd with preset full needs ΔW factors of rank 8 "
     r"\(lora\.presets\.full\.r\), but the largest of delta\.ranks is 2"),
    ("lora:\n  presets:\n    full: {use_dora: true}\n",
     r"ConfigError: lora\.grid\.inits: svd sets W_base \+ ΔW_r through plain LoRA factors; it cannot start a preset "
     r"with use_dora"),
    # an init the preset or the training split cannot start
    ("lora:\n  presets:\n    full: {r: 7}\n  grid:\n    inits: [random, orthogonal]\n",
     r"ConfigError: lora\.grid\.inits: orthogonal splits one r×r rotation in halves; it needs an even r "
     r"\(the preset's is 7\)"),
    ("lora:\n  eva: {batches: 41}\n  grid:\n    inits: [random, eva]\n",
     r"ConfigError: lora\.eva\.batches: eva preprocessing reads 328 training records, more than the 320 there are"),
    # unknown grid entries, schema ranges, library range checks
    ("lora:\n  grid:\n    presets: [standard, nope]\n",
     r"ConfigError: lora\.grid\.presets: unknown preset 'nope' \(known: .*\)"),
    ("head:\n  dropout: 1.5\n", r"ConfigError: head\.dropout: 1\.5 is greater than or equal to the maximum of 1"),
    ("model:\n  tiny:\n    text_heads: 3\n",
     r"ConfigError: model\.tiny\.text_hidden_size: must be divisible by text_heads"),
    ("model:\n  tiny:\n    arch: qwen4_vl\n",
     r"ConfigError: model\.tiny\.arch: 'qwen4_vl' is not one of \['qwen2_5_vl', 'qwen3_vl'\]"),
    ("teacher:\n  warmup_steps: 500\n", r"ConfigError: teacher\.warmup_steps: must be in \[0, max_steps\]"),
    ("lora:\n  train:\n    negative_word: tampered\n",
     r"ConfigError: lora\.train\.negative_word: must differ from positive_word"),
    # a teacher asked another question than the arms and the references it is compared with
    ("lora:\n  train:\n    question: Is this image edited? Answer with one word.\n",
     r"ConfigError: teacher\.question: 'Is this image real or tampered\? Answer with one word\.' differs from "
     r"lora\.train\.question 'Is this image edited\? Answer with one word\.'; the teacher, the arms and the "
     r"references must answer the same question with the same words"),
    ("delta:\n  include: '(unclosed'\n", r"ConfigError: delta\.include: not a valid regular expression"),
    # what the model's shape decides
    ("delta:\n  include: 'nothing_here'\n",
     r"ConfigError: delta\.include: 'nothing_here' matches no linear module of the model"),
    ("features:\n  image_size: 60\n",
     r"ConfigError: features\.image_size: 60 is not a multiple of 8, the model's patch size x merge size"),
    ("lowrank:\n  rank: 65\n",
     r"ConfigError: lowrank\.rank: 65 exceeds min\(tokens, channels\) = min\(64, 64\) of the features"),
    ("lowrank:\n  epochs: 10\n",
     r"ConfigError: lowrank\.allocator_init_warmup: 100 init \+ 300 final warm-up steps leave no budgeting phase in "
     r"400 steps"),
    # batches the training split or the data-parallel processes cannot hold
    ("teacher:\n  batch_size: 400\n", r"ConfigError: teacher\.batch_size: 400 is more than the 320 training records"),
    ("lora:\n  train_by_objective:\n    head: {batch_size: 321}\n",
     r"ConfigError: lora\.train_by_objective\.head\.batch_size: 321 is more than the 320 training records"),
    ("resources:\n  train_lora: {gpu: 3}\n",
     r"ConfigError: lora\.train\.batch_size: 8 must split evenly over the 3 data-parallel processes"),
    # a source that is not there
    ("model:\n  source: /nonexistent/checkpoint\n",
     r"ConfigError: model\.source: /nonexistent/checkpoint is not a directory"),
    ("dataset:\n  source: /nonexistent/annotations\n",
     r"DataError: dataset\.source: /nonexistent/annotations is not a directory"),
    ("eval:\n  general_text: /nonexistent/texts.txt\n",
     r"ConfigError: eval\.general_text: /nonexistent/texts\.txt is not a file"),
]


@pytest.mark.parametrize("edit, message", CASES, ids=[message.split(": ")[1].replace("\\", "") for _, message in CASES])
def test_a_bad_config_fails_with_one_line_before_any_job(failed_runs, edit, message):
    workdir, result = failed_runs[edit]
    assert result.returncode == 1
    assert re.match(message, result.stderr.splitlines()[-1]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "results").exists() and not (workdir / "data").exists()


def test_a_checkpoint_without_a_config_names_its_file(workdir, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    config = write_yaml(tmp_path / "edit.yaml", f"model:\n  source: {checkpoint}\n")
    result = snakemake(workdir, REPORT, "--configfile", "config/config.yaml", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"CheckpointError: {checkpoint / 'config.json'}: missing (not a "
                                              "transformers checkpoint directory)")
    assert not (workdir / "results").exists()


def test_a_missing_split_file_names_its_key_and_path(workdir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.json").write_text("[]")
    config = write_yaml(tmp_path / "edit.yaml", f"dataset:\n  source: {data}\n")
    result = snakemake(workdir, REPORT, "--configfile", "config/config.yaml", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"DataError: dataset.splits.test: {data / 'test.json'} does not exist"
    assert not (workdir / "results").exists()


DEPTH = "config/examples/depth_eth3d_tiny.yaml"
DEPTH_CASES = [
    # a part the depth model does not have, and a selection of the wrong form for its part
    ("lora:\n  strategies:\n    later_half: {vision: all}\n",
     r"ConfigError: lora\.strategies\.later_half\.vision: not a part of this model "
     r"\(its parts: backbone, neck, head\)"),
    ("lora:\n  strategies:\n    all: {backbone: true}\n",
     r"ConfigError: lora\.strategies\.all\.backbone: takes a layer selection .*, not True"),
    ("lora:\n  grid:\n    objectives: [depth, lm]\n",
     r"ConfigError: lora\.grid\.objectives: unknown objective 'lm' \(known: depth\)"),
    ("teacher:\n  batch_size: 40\n", r"ConfigError: teacher\.batch_size: 40 is more than the 39 training records"),
    # inits the depth batches or the convolutions in the strategies cannot take
    ("lora:\n  grid:\n    inits: [random, corda]\n",
     r"ConfigError: lora\.grid\.inits: corda is not available for model\.modality depth: PEFT's covariance hook"),
    ("lora:\n  grid:\n    inits: [random, eva]\n",
     r"ConfigError: lora\.grid\.inits: eva initialises linear layers only, but the arm's strategy also targets "
     r"\d+ other modules \(head\."),
    ("model:\n  backend: vggt\n", r"ConfigError: model\.source: the tiny model is a transformers model"),
    ("dataset:\n  eth3d:\n    split: {train: 0.5, val: 0.1, test: 0.1}\n", r"ConfigError: dataset\.eth3d\.split: .*"),
    ("dataset:\n  source: /nonexistent/eth3d\n",
     r"DataError: dataset\.source: /nonexistent/eth3d is not a directory \(of ETH3D scenes, or 'synthetic'\)"),
]


@pytest.mark.parametrize("edit, message", DEPTH_CASES,
                         ids=[message.split(": ")[1].replace("\\", "") for _, message in DEPTH_CASES])
def test_a_bad_depth_config_fails_with_one_line_before_any_job(failed_runs, edit, message):
    workdir, result = failed_runs[(DEPTH, edit)]
    assert result.returncode == 1
    assert re.match(message, result.stderr.splitlines()[-1]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "results").exists() and not (workdir / "data").exists()
