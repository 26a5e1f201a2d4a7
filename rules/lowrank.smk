"""Low-rank feature decomposition: projection nets X -> (A, B) per arch, compared with the per-sample SVD."""


rule train_lowrank_proj:
    input:
        train="results/features/train.safetensors",
        val="results/features/val.safetensors",
    output:
        weights="results/lowrank/{arch}/model.safetensors",
        history="results/lowrank/{arch}/history.json",
        curve="results/lowrank/{arch}/loss_curve.png",
    params:
        lowrank=lowrank_settings(),
        state_dir="results/state/lowrank/{arch}",
    threads: rule_threads("train_lowrank_proj")
    resources:
        **rule_resources("train_lowrank_proj"),
    log:
        "results/lowrank/{arch}/train.log",
    benchmark:
        benchmark_path("train_lowrank_proj", "_{arch}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/train_lowrank_proj.py"


rule compare_lowrank:
    input:
        weights="results/lowrank/{arch}/model.safetensors",
        test="results/features/test.safetensors",
    output:
        comparison="results/lowrank/{arch}/comparison.json",
        spatial="results/lowrank/{arch}/comparison.png",
    params:
        lowrank=lowrank_settings(),
    threads: rule_threads("compare_lowrank")
    resources:
        **rule_resources("compare_lowrank"),
    log:
        log_path("compare_lowrank", "_{arch}"),
    benchmark:
        benchmark_path("compare_lowrank", "_{arch}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/compare_lowrank.py"
