"""`tilevlm demo` end to end with a few steps: it trains, evaluates, saves a model that
`tilevlm generate` loads, and draws the example figure (the accuracy goal is measured in
docs/demo_recipe.md, not here: a test cannot afford the full run)."""

import json

from PIL import Image

from tilevlm.cli import main


def test_demo_runs_end_to_end_and_its_model_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps", "12", "--batch-size", "8",
                 "--test-size", "24", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "held-out test accuracy (exact match)" in printed
    for qtype in ("colour", "shape", "where"):
        assert qtype in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 24 and 0.0 <= report["score"] <= 1.0
    assert report["demo_config"]["steps"] == 12 and report["total_seconds"] > 0
    figure = Image.open(out / "example.png")
    assert figure.width >= 480  # small tiles are scaled up to stay readable
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "step" in m]
    assert losses[-1] < losses[0]  # it learns something even in 12 steps
    image = tmp_path / "q.png"
    Image.new("RGB", (64, 32), (200, 30, 30)).save(image)
    assert main(["generate", "--model", str(out / "model"), "--image", str(image),
                 "--prompt", "What colour is the shape in row 1, column 2?",
                 "--max-new-tokens", "4"]) == 0



def test_long_recipe_and_steps_reach_the_demo_config(monkeypatch):
    import tilevlm.demo as demo_job

    seen = []

    def stop(cfg):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_job, "run_demo", stop)
    for argv in (["demo"], ["demo", "--long"], ["demo", "--long", "--steps", "500"]):
        assert main(argv) == 130  # stopped before training, as Ctrl-C would
    default, long, short_long = seen
    assert (default.steps, default.later_qtype_weights) == (demo_job.DemoConfig().steps, None)
    assert (long.steps, long.later_from_step) == (12000, 3000)
    assert long.later_qtype_weights == demo_job.LONG_RECIPE["later_qtype_weights"]
    assert (short_long.steps, short_long.later_from_step) == (500, 3000)
