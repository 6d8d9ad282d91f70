"""Benchmark suites of ``jobs.benchmark``, registered by name.

A suite is ``run(args: argparse.Namespace) -> dict`` returning at least
``{"results": [result(...), ...]}`` plus any suite-specific keys; ``jobs.benchmark`` adds
``suite`` and ``runtime_s``, writes the JSON and a markdown table next to it.
"""

SUITES = {
    "meta_lora_linear": "metaprep.bench.meta_lora_linear:run",
    "config_transfer": "metaprep.bench.config_transfer:run",
    "persona": "metaprep.bench.lm_suites:run_persona",
    "multidomain": "metaprep.bench.lm_suites:run_multidomain",
    "summarization": "metaprep.bench.lm_suites:run_summarization",
    "convai2_mc": "metaprep.bench.convai2_mc:run",
    "throughput": "metaprep.bench.throughput:run",
    "adapt_transfer": "metaprep.bench.adapt_transfer:run",
}
