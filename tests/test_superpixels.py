"""Superpixel graphs of Fashion-MNIST (Dwivedi et al.'s construction) and their cached dataset."""
import csv

import numpy as np
import pytest
import torch

from attvig_pyg.data import load_fashion_mnist
from attvig_pyg.data.superpixels import FashionMNISTSuperpixels, superpixel_graph


@pytest.fixture(scope="module")
def images():
    pixels, labels = load_fashion_mnist("test")
    return pixels[:12].numpy()


def test_superpixel_graphs_of_real_images(images):
    for image in images:
        graph = superpixel_graph(image)
        nodes = graph.num_nodes
        assert 8 < nodes <= 75
        assert graph.x.shape == (nodes, 3) and torch.equal(graph.x[:, 1:], graph.pos)
        assert (graph.x >= 0).all() and (graph.x[:, 0] <= 1).all() and (graph.x[:, 1:] < 1).all()
        # Exactly 8 outgoing edges per node, never to itself, never twice.
        source, target = graph.edge_index
        assert torch.equal(torch.bincount(source, minlength=nodes), torch.full((nodes,), 8))
        assert (source != target).all()
        assert len({tuple(e) for e in graph.edge_index.t().tolist()}) == 8 * nodes
        weights = graph.edge_attr.squeeze(1)
        assert graph.edge_attr.shape == (8 * nodes, 1)
        assert (weights > 0).all() and (weights <= 1).all()
        # The weights from the definition: exp(-(d_xy / s_i)^2 - (d_f / s_i)^2), s_i node i's
        # mean distance to its 8 nearest (symmetric distances, the sender's scale).
        xy, f = graph.pos.double(), graph.x[:, :1].double()
        d_xy, d_f = torch.cdist(xy, xy), torch.cdist(f, f)
        s_xy = d_xy.sort(dim=1).values[:, 1:9].mean(dim=1) + 1e-8
        s_f = d_f.sort(dim=1).values[:, 1:9].mean(dim=1) + 1e-8
        expected = torch.exp(-(d_xy[source, target] / s_xy[source]) ** 2 -
                             (d_f[source, target] / s_f[source]) ** 2)
        # (In log space: the features are stored in float32, which the exponent amplifies.)
        assert torch.allclose(weights.double().log(), expected.log(), rtol=1e-4, atol=1e-4)
        # Each node's 8 are its most affine: no other node has a larger affinity.
        affinity = torch.exp(-(d_xy / s_xy[:, None]) ** 2 - (d_f / s_f[:, None]) ** 2)
        affinity.fill_diagonal_(-1)
        eighth = affinity.sort(dim=1, descending=True).values[:, 7]
        assert (expected >= eighth[source] * (1 - 1e-3)).all()  # (float32 features here)


def test_few_superpixels_join_every_other_node():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[:, 14:] = 255
    graph = superpixel_graph(image, max_nodes=4, first_segments=4)
    nodes = graph.num_nodes
    assert nodes <= 4
    assert graph.edge_index.size(1) == nodes * (nodes - 1)


def test_the_dataset_builds_once_and_anew_for_other_settings(tmp_path, monkeypatch):
    import attvig_pyg.data.superpixels as module

    monkeypatch.setitem(module.VALIDATION, False, 10)
    subset = torch.arange(30)
    original = module.load_fashion_mnist
    monkeypatch.setattr(module, "load_fashion_mnist",
                        lambda split, full=False: tuple(t[subset] for t in original(split, full)))
    train = FashionMNISTSuperpixels(tmp_path, "train", workers=1)
    val = FashionMNISTSuperpixels(tmp_path, "val", workers=2)  # in two processes
    assert len(train) == 20 and len(val) == 10
    assert train[0].y.shape == (1,) and train.num_classes == 10
    files = sorted(p.name for p in (tmp_path / "processed").glob("*.pt"))
    calls = []
    monkeypatch.setattr(module, "superpixel_graph", lambda *a, **k: calls.append(1))
    assert len(FashionMNISTSuperpixels(tmp_path, "train", workers=1)) == 20  # from the cache
    assert not calls
    monkeypatch.undo()
    monkeypatch.setattr(module, "load_fashion_mnist",
                        lambda split, full=False: tuple(t[subset] for t in original(split, full)))
    monkeypatch.setitem(module.VALIDATION, False, 10)
    other = FashionMNISTSuperpixels(tmp_path, "train", workers=1, settings=dict(neighbours=4))
    assert sorted(p.name for p in (tmp_path / "processed").glob("*.pt")) != files
    assert other[0].edge_index.size(1) == 4 * other[0].num_nodes
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        FashionMNISTSuperpixels(tmp_path, "dev")
    with pytest.raises(ValueError, match="Unknown superpixel settings"):
        FashionMNISTSuperpixels(tmp_path, "train", settings=dict(segments=3))


# ---- experiments/superpixels.py -------------------------------------------------------------

@pytest.fixture
def few_graphs(tmp_path, monkeypatch):
    """30 training images (20 / 10 graphs) and 20 test images, cached under tmp_path."""
    import attvig_pyg.data.superpixels as module

    original = module.load_fashion_mnist
    monkeypatch.setitem(module.VALIDATION, False, 10)
    monkeypatch.setattr(module, "load_fashion_mnist", lambda split, full=False: tuple(
        t[:30 if split == "train" else 20] for t in original(split, full)))
    return ["--data-root", str(tmp_path / "graphs"), "--batch-size", "8", "--epochs", "2"]


def test_the_table_trains_tests_reports_and_skips_finished_runs(few_graphs, tmp_path, capsys):
    import superpixels

    output = tmp_path / "table"
    argv = ["--convs", "cross_attn_edges", "gcn", "--seeds", "0", "--output", str(output),
            *few_graphs]
    results = superpixels.main(argv)
    assert [(r["conv"], r["seed"]) for r in results] == [("cross_attn_edges", 0), ("gcn", 0)]
    for r in results:
        assert 0 <= r["test_accuracy"] <= 100 and r["test_graphs"] == 20
    text = (output / "superpixels.md").read_text()
    assert "| cross_attn_edges |" in text and "| gcn |" in text and "vs gatv2" in text
    assert "step ms (batch 8)" in text
    with open(output / "superpixels.csv") as handle:
        costs = {row["conv"]: row for row in csv.DictReader(handle)}
    for conv in ("cross_attn_edges", "gcn"):  # measured, each in its own process
        assert float(costs[conv]["step_ms"]) > 0 and float(costs[conv]["step_peak_mib"]) > 0
    assert (output / "superpixels.csv").is_file() and (output / "superpixels.png").is_file()
    assert (output / "gcn" / "seed0" / "test.json").is_file()
    capsys.readouterr()
    superpixels.main(argv)  # every run finished: nothing trains again
    assert "epoch 1/2" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="other settings"):
        superpixels.main([*argv, "--lr", "0.01"])
    with pytest.raises(SystemExit, match="--seed is set per run"):
        superpixels.main([*argv, "--seed", "3"])


def test_one_run_and_its_evaluation(few_graphs, tmp_path, capsys):
    import superpixels

    superpixels.main(["--run", "--conv", "gatv2", "--output", str(tmp_path / "one"), *few_graphs])
    assert (tmp_path / "one" / "results.json").is_file()  # --output is the run's, not the table's
    metrics = superpixels.main(["--run", "--eval-only", "--checkpoint",
                                str(tmp_path / "one" / "best.pth"), *few_graphs[:2]])
    assert metrics["graphs"] == 20
    assert "on the test graphs" in capsys.readouterr().out


def test_the_plateau_schedule_resumes_with_its_counters():
    import superpixels

    weights = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weights], lr=1e-3)
    schedule = superpixels.PlateauSchedule(optimizer, patience=2, min_lr=1e-5)
    for accuracy in (50, 60, 60, 60):  # one better, then two epochs without improvement
        schedule.step(0, accuracy)
    restored = superpixels.PlateauSchedule(optimizer, patience=2, min_lr=1e-5)
    restored.load_state_dict(schedule.state_dict())
    restored.step(0, 60)  # the third epoch without improvement: the rate halves
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_every_conv_has_about_100k_parameters():
    import superpixels

    for conv in superpixels.CONVS:
        model = superpixels.SuperpixelGNN(conv, superpixels.width_for(conv))
        assert 90_000 <= sum(p.numel() for p in model.parameters()) <= 110_000, conv


def test_the_worked_example_runs():
    """docs/general-graphs.md's example, as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "general-graphs.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "general-graphs.md", "exec"), namespace)
    assert namespace["gat_logits"].shape == namespace["cross_logits"].shape == (50, 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("conv", ["cross_attn", "cross_attn_edges"])
def test_amp_trains_the_superpixel_classifier(few_graphs, tmp_path, dtype, conv):
    """--amp on the CPU (torch's CPU autocast; GradScaler("cpu") for float16)."""
    import json
    import math

    import superpixels
    output = tmp_path / "amp"
    superpixels.main(["--run", "--conv", conv, "--output", str(output), "--amp", "--amp-dtype",
                      dtype, *few_graphs])
    results = json.loads((output / "results.json").read_text())
    assert math.isfinite(results["final"]["train"]["loss"])
    assert results["config"]["amp"] and results["config"]["amp_dtype"] == dtype
