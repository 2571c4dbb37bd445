"""Benchmarks on local data: the field's metrics, named tasks (column mapping, prompt, metric),
and the run that scores a model on one, with a JSON report and every prediction as JSONL."""
