"""Vision-token features of every split, cached as safetensors."""


rule extract_features:  # short, and soon: the feature users and the frozen-head arms wait for it
    priority: 5
    input:
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
    output:
        features="results/features/{split}.safetensors",
        stats="results/features/{split}_stats.json",
    params:
        features=config_slice("features"),
        model_dtype=config_slice("model", "dtype"),
    threads: rule_threads("extract_features")
    resources:
        **rule_resources("extract_features"),
    log:
        log_path("extract_features", "_{split}"),
    benchmark:
        benchmark_path("extract_features", "_{split}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/extract_features.py"
