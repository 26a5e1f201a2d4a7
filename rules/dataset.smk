"""Dataset: generate the synthetic default, then validate whichever annotations into a manifest."""


rule make_synthetic_dataset:
    output:
        directory(synthetic_dir()),
    params:
        synthetic=config_slice("dataset", MODALITY.synthetic or "synthetic"),
        modality=config["model"]["modality"],
    threads: rule_threads("make_synthetic_dataset")
    resources:
        **rule_resources("make_synthetic_dataset"),
    log:
        log_path("make_synthetic_dataset"),
    benchmark:
        benchmark_path("make_synthetic_dataset")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/make_synthetic_dataset.py"


rule prepare_dataset:  # before other ready jobs: a bad input fails before anything expensive has started
    priority: 10
    input:
        annotations=annotation_input,
        **({"model": "results/model/model.json"} if MODALITY.dataset_reads_model else {}),
    output:
        "results/dataset/manifest.json",
    params:
        dataset={key: value for key, value in config_slice("dataset").items() if key in MODALITY.dataset_keys},
        modality=config_slice("model", "modality"),
        **({"task": task_settings(training_only=True)} if MODALITY.dataset_reads_model else {}),
    threads: rule_threads("prepare_dataset")
    resources:
        **rule_resources("prepare_dataset"),
    log:
        log_path("prepare_dataset"),
    benchmark:
        benchmark_path("prepare_dataset")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/prepare_dataset.py"
