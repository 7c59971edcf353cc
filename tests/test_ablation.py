"""experiments/ablation.py: the flops table, the CPU profile's graphs, and resuming a reproduction."""
import json
import re

import pytest
import timm

import ablation
import imagenet
from conftest import QUICK_TRAINING

TINY_VIG = json.dumps(dict(channels=16, depth=2, head_hidden_size=16, heads=4, img_size=32,
                           patch_size=8, k=2))


def test_flops_table_rows_are_within_ten_percent_of_the_original_vig(tmp_path):
    text = ablation.flops_table(tmp_path)
    assert (tmp_path / "flops.md").read_text() == text
    rows = {match[0]: float(match[1]) for match in
            re.findall(r"^\| (\w+) \| [\d.]+ \| ([\d.]+) \|", text, re.M)}
    assert list(rows) == ["gin", "sage", "edge", "max_relative", "cross_attn"]
    for aggregator, macs in rows.items():  # cross-attention has only the paper's figure
        reference = ablation.ORIGINAL_MACS.get(aggregator, ablation.PAPER_MACS[aggregator])
        assert abs(macs / reference - 1) < 0.10, (aggregator, macs)
    assert "| cross_attn | 8.51 | 1.567 | - | - | 1.6 | -2.1% |" in text


def test_cpu_profile_keeps_every_knn_graph_at_most_half_complete():
    _, kwargs = ablation.PROFILES["cpu"]["models"]["vig_ti"]
    model = timm.create_model("vig_ti", **kwargs)
    nodes = (kwargs["img_size"] // kwargs["patch_size"]) ** 2
    for block in model.graph_summary(kwargs["img_size"]):
        assert block["k"] * block["dilation"] <= nodes / 2, block


def test_interrupted_reproduction_resumes_and_skips_finished_runs(image_folder, tmp_path,
                                                                  monkeypatch):
    argv = ["--table", "aggregation", "--runs", "gin", "cross_attn", "--seeds", "0",
            "--output", str(tmp_path / "ablation"), "--model-kwargs", TINY_VIG,
            "--data-dir", str(image_folder), "--epochs", "1", *QUICK_TRAINING]
    ablation.main(argv)
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / "ablation" / f"aggregation.{suffix}").is_file()
    table = (tmp_path / "ablation" / "aggregation.md").read_text()
    assert re.search(r"^\| gin \| [\d.]+ ± nan \|", table, re.M)
    assert re.search(r"^\| cross_attn \| [\d.]+ ± nan \|", table, re.M)

    # gin as if killed after its last checkpoint: only it runs again, from that checkpoint.
    gin = tmp_path / "ablation" / "aggregation" / "gin" / "seed0"
    (gin / "results.json").unlink()
    calls = []
    train = imagenet.train

    def recording_train(args):
        calls.append(args)
        return train(args)
    monkeypatch.setattr(imagenet, "train", recording_train)
    ablation.main(argv)
    assert [args.resume for args in calls] == [gin / "last.pth"]
    assert (gin / "results.json").is_file()

    calls.clear()
    ablation.main(argv)
    assert calls == []

    # The same folder asked for other settings: the finished runs are not counted as these.
    longer = [*argv[:argv.index("--epochs")], "--epochs", "2", *argv[argv.index("--epochs") + 2:]]
    with pytest.raises(SystemExit, match=r"gin/seed0 holds a finished run with other settings "
                                         r"than this command:\n  --epochs: the run has 1, this "
                                         r"command 2"):
        ablation.main(longer)
    assert calls == []


@pytest.mark.parametrize("argv, message", [
    (["--table", "aggregation", "--seed", "3"], "--seed is set per run"),
    (["--table", "heads", "--runs", "nine_heads"], "unknown run(s) nine_heads for --table heads"),
    (["--table", "aggregation", "--epochs", "many"], "invalid int value"),
])
def test_bad_options_fail_before_any_training(argv, message, capsys):
    with pytest.raises(SystemExit) as failure:
        ablation.main(argv)
    assert message in str(failure.value) + capsys.readouterr().err


def test_paired_difference_is_the_t_interval():
    # Differences 1.0, 2.0, 4.0: mean 7/3, sample std sqrt(7/3), t(0.975, 2) = 4.302653.
    values, reference = {0: 81.0, 1: 82.0, 2: 84.0, 7: 50.0}, {0: 80.0, 1: 80.0, 2: 80.0}
    d = ablation.paired_difference(values, reference)
    half = 4.302653 * (7 / 3) ** 0.5 / 3 ** 0.5
    assert d["seeds"] == 3  # seed 7 has no partner
    assert d["mean"] == pytest.approx(7 / 3) and d["std"] == pytest.approx((7 / 3) ** 0.5)
    assert d["low"] == pytest.approx(7 / 3 - half, abs=1e-5)
    assert d["high"] == pytest.approx(7 / 3 + half, abs=1e-5)
    assert not d["distinguishable"]  # the interval [-1.46, 6.13] holds 0
    assert ablation.paired_difference({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0})[
        "distinguishable"]


def test_the_robustness_table_pairs_seeds(image_folder, tmp_path):
    argv = ["--table", "robustness", "--runs", "gin_p0", "gin_p1", "cross_attn_p0",
            "cross_attn_p1", "--seeds", "0", "1", "--output", str(tmp_path / "ablation"),
            "--model-kwargs", TINY_VIG, "--data-dir", str(image_folder), "--epochs", "1",
            *QUICK_TRAINING]
    ablation.main(argv)
    text = (tmp_path / "ablation" / "robustness.md").read_text()
    assert re.search(r"^\| cross_attn_p0 \| [\d.]+ ± [\d.]+ \| [\d.]+, [\d.]+ \| \(reference\)",
                     text, re.M)
    assert re.search(r"^\| gin_p1 \| .* \| [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \| (yes|no) \|",
                     text, re.M)
    assert re.search(r"^\| gin \| [\d.]+ ± [\d.]+ \| - \| [\d.]+ ± [\d.]+ \| - \| [+-][\d.]+ \[",
                     text, re.M)  # p = 0.5 was not trained
    config = json.loads((tmp_path / "ablation" / "robustness" / "gin_p1" / "seed0" /
                         "results.json").read_text())["config"]
    assert config["model_kwargs"]["graph_corruption"] == 1.0
