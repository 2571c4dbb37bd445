"""`tilevlm eval` and the training loop's validation: batched greedy answers, the field's metrics
(as lmms-eval computes them), named benchmark tasks, reports."""
