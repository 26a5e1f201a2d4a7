"""Base model: build the tiny default, or check a local checkpoint; either way describe it in model.json."""


rule build_tiny_model:
    output:
        directory(tiny_model_dir()),
    params:
        tiny=config_slice("model", MODALITY.tiny or "tiny"),
        modality=config["model"]["modality"],
    threads: rule_threads("build_tiny_model")
    resources:
        **rule_resources("build_tiny_model"),
    log:
        log_path("build_tiny_model"),
    benchmark:
        benchmark_path("build_tiny_model")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/build_tiny_model.py"


rule prepare_model:  # before other ready jobs: a bad input fails before anything expensive has started
    priority: 10
    input:
        model_checkpoint_input,
    output:
        "results/model/model.json",
    params:
        model=config_slice("model"),
    threads: rule_threads("prepare_model")
    resources:
        **rule_resources("prepare_model"),
    log:
        log_path("prepare_model"),
    benchmark:
        benchmark_path("prepare_model")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/prepare_model.py"
