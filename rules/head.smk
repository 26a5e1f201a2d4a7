"""Detection head pre-trained on the cached vision features: warm classification phase, then joint."""


rule pretrain_head:  # short, and soon: the frozen-head arms wait for it
    priority: 5
    input:
        train="results/features/train.safetensors",
        val="results/features/val.safetensors",
        test="results/features/test.safetensors",
    output:
        head="results/head/head.safetensors",
        head_args="results/head/head.json",
        history="results/head/history.csv",
        heatmaps="results/head/heatmaps.png",
        metrics="results/head/metrics.json",
    params:
        head=config_slice("head"),
    threads: rule_threads("pretrain_head")
    resources:
        **rule_resources("pretrain_head"),
    log:
        log_path("pretrain_head"),
    benchmark:
        benchmark_path("pretrain_head")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/pretrain_head.py"
