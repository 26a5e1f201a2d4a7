"""The HTML report, rendered from the stages' JSON outputs; the grid's baseline arm anchors its comparisons."""


rule report:
    input:
        unpack(report_inputs),
    output:
        "results/reports/ablation.html",
    params:
        config_hash=experiment_hash(),
        baseline=grid_baseline(),
        modality=config["model"]["modality"],
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/report.py"
