"""Dense prediction: the FPN backbone and Semantic FPN (library), the synthetic scenes, the
metrics, and experiments/detection.py and experiments/segmentation.py on tiny runs."""
import json
import math
import re
import os
import signal

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN

import detection
import engine
import segmentation
from attvig_pyg.data import SCENE_CLASSES, fashion_scenes
from attvig_pyg.models import SemanticFPN, attentionvig_fpn_backbone
from attvig_pyg.nn import CrossAttnConv

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], head_hidden_size=16, heads=4)
TINY_MODEL = json.dumps(TINY)


def tiny_model():
    return timm.create_model("attentionvig_s", num_classes=0, **TINY)


def betas(module):
    return [m.log_beta for m in module.modules() if isinstance(m, CrossAttnConv)]


# ---- library --------------------------------------------------------------------------------

def test_fpn_backbone_gives_torchvision_its_pyramid():
    backbone = attentionvig_fpn_backbone(tiny_model(), out_channels=32)
    features = backbone(torch.randn(2, 3, 128, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in features.values()] == [
        (2, 32, 32, 24), (2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3), (2, 32, 2, 2)]
    assert backbone.out_channels == 32
    detector = MaskRCNN(backbone, num_classes=3, min_size=96, max_size=128).eval()
    with torch.no_grad():
        outputs = detector([torch.rand(3, 96, 128)])
    assert set(outputs[0]) == {"boxes", "labels", "scores", "masks"}


def test_beta_is_frozen_unless_asked_and_only_trainable_stages_train():
    frozen = attentionvig_fpn_backbone(tiny_model())
    assert betas(frozen) and not any(b.requires_grad for b in betas(frozen))
    trained = attentionvig_fpn_backbone(tiny_model(), train_beta=True)
    assert all(b.requires_grad for b in betas(trained))
    two = attentionvig_fpn_backbone(tiny_model(), trainable_stages=2, train_beta=True)
    trainable = {name.split(".")[0] for name, p in two.body.named_parameters() if p.requires_grad}
    assert trainable == {"stage3", "stage4"}
    assert [b.requires_grad for b in betas(two)] == [False] * 4 + [True] * 4  # 2 per stage


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_batchnorm_statistics_do_not_move_in_a_training_step(norm):
    backbone = attentionvig_fpn_backbone(tiny_model(), norm=norm).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()
              if "running_" in k}
    assert before
    sum(f.sum() for f in backbone(torch.randn(2, 3, 64, 64)).values()).backward()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    plain = attentionvig_fpn_backbone(tiny_model(), norm="train").train()
    statistics = {k: v.clone() for k, v in plain.state_dict().items() if "running_mean" in k}
    plain(torch.randn(2, 3, 64, 64))
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in statistics.items())


def test_fpn_backbone_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Expected an AttentionViG"):
        attentionvig_fpn_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'trainable_stages' must be in 0..5"):
        attentionvig_fpn_backbone(tiny_model(), trainable_stages=6)
    with pytest.raises(ValueError, match="Unknown 'norm' mode 'sync'"):
        attentionvig_fpn_backbone(tiny_model(), norm="sync")
    with pytest.raises(ValueError, match="'returned_stages' must name stages in 1..4"):
        attentionvig_fpn_backbone(tiny_model(), returned_stages=(0, 1))


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (70, 99)])
def test_semantic_fpn_returns_logits_at_the_input_size(size):
    model = SemanticFPN(attentionvig_fpn_backbone(tiny_model(), out_channels=32), num_classes=5,
                        channels=32)
    assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)


# ---- the synthetic scenes -------------------------------------------------------------------

def test_scenes_are_deterministic_and_consistent(tmp_path):
    from pycocotools.coco import COCO

    folder = fashion_scenes(tmp_path / "a", train_scenes=6, val_scenes=3, size=96, seed=3)
    again = fashion_scenes(tmp_path / "b", train_scenes=6, val_scenes=3, size=96, seed=3)
    assert fashion_scenes(tmp_path / "a", train_scenes=6, val_scenes=3, size=96,
                          seed=3) == folder  # written once
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((folder / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert "synthetic layouts" in (folder / "README.md").read_text()
    coco = COCO(str(folder / "coco" / "annotations" / "instances_train2017.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getCatIds()) == 10
    for image_id in coco.getImgIds():
        labels = np.array(Image.open(folder / "ade" / "annotations" / "training" /
                                     coco.imgs[image_id]["file_name"]))
        assert labels.shape == (96, 96) and labels.min() >= 1 and labels.max() <= 11
        for annotation in coco.imgToAnns[image_id]:
            mask = coco.annToMask(annotation).astype(bool)
            assert mask.sum() == annotation["area"] >= 50
            # The instance's pixels carry its class in the label map.
            assert (labels[mask] == 1 + annotation["category_id"]).all()
            x, y, w, h = annotation["bbox"]
            assert mask[:, x:x + w][y:y + h].sum() == mask.sum()


# ---- metrics --------------------------------------------------------------------------------

@pytest.fixture
def scenes(tmp_path):
    return fashion_scenes(tmp_path / "scenes", train_scenes=8, val_scenes=4, size=96, seed=1)


def test_coco_ap_of_the_ground_truth_is_100_and_of_nothing_0(scenes):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO(str(scenes / "coco" / "annotations" / "instances_val2017.json"))
    results = []
    for annotation in coco.dataset["annotations"]:
        rle = mask_utils.encode(np.asfortranarray(coco.annToMask(annotation)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(dict(image_id=annotation["image_id"], bbox=annotation["bbox"],
                            category_id=annotation["category_id"], score=1.0,
                            segmentation=rle))
    perfect = detection.coco_metrics(coco, results)
    assert all(math.isclose(perfect[f"{kind}_{name}"], 100.0) for kind in ("bbox", "segm")
               for name in ("AP", "AP50", "AP75")), perfect
    assert set(detection.coco_metrics(coco, []).values()) == {0.0}


def test_miou_of_a_known_pair():
    truth = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    # class 0: hits 2, truth 3, predicted 3 -> IoU 2/4; class 1: 2/3; class 2: 1/2.
    metrics = segmentation.segmentation_metrics(segmentation.confusion(prediction, truth, 3))
    assert math.isclose(metrics["mIoU"], 100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert math.isclose(metrics["aAcc"], 100 * 5 / 7)
    assert math.isclose(metrics["mAcc"], 100 * (2 / 3 + 1 + 1 / 2) / 3)


# ---- the programs ---------------------------------------------------------------------------

def quick(data_dir, output, *extra):
    return ["--data-dir", str(data_dir), "--model-kwargs", TINY_MODEL, "--workers", "0",
            "--batch-size", "2", "--epochs", "2", "--output", str(output), *map(str, extra)]


def detection_quick(data_dir, output, *extra):
    return quick(data_dir, output, "--min-size", "96", "--max-size", "96",
                 "--box-batch-size-per-image", "32", *extra)


def test_detection_trains_evaluates_and_resumes_exactly(scenes, tmp_path, monkeypatch, capsys):
    common = detection_quick(scenes / "coco", tmp_path / "straight", "--warmup-iters", "2",
                             "--epochs", "1")
    detection.main(common)
    printed = capsys.readouterr().out
    assert "attentionvig_s after 1 epochs" in printed and "bbox AP" in printed
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert set(results["final"]["eval"]) >= {"bbox_AP", "bbox_AP50", "segm_AP75"}
    assert results["best"]["metric"] == "bbox_AP"
    state = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    assert all(math.isclose(v.exp().item(), 1.0) for k, v in state["model"].items()
               if k.endswith("log_beta"))  # frozen by default: still beta_init

    train_step = engine.TrainingRun.train_step

    def signal_after_step_2(self, batch):  # of 4 (8 scenes, batch 2)
        train_step(self, batch)
        if (self.epoch, self.step) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine.TrainingRun, "train_step", signal_after_step_2)
    interrupted = [a if a != str(tmp_path / "straight") else str(tmp_path / "stopped")
                   for a in common]
    with pytest.raises(SystemExit):
        detection.main(interrupted)
    monkeypatch.setattr(engine.TrainingRun, "train_step", train_step)
    detection.main(["--resume", str(tmp_path / "stopped" / "last.pth")])
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    capsys.readouterr()
    metrics = detection.main(["--eval-only", "--checkpoint", str(tmp_path / "straight" /
                                                                 "best.pth")])
    assert math.isclose(metrics["bbox_AP"], results["best"]["score"], abs_tol=1e-9)


def test_detection_train_beta_makes_beta_learn(scenes, tmp_path):
    detection.main(detection_quick(scenes / "coco", tmp_path / "run", "--train-beta",
                                   "--epochs", "1"))
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    assert any(not math.isclose(v.exp().item(), 1.0) for k, v in state.items()
               if k.endswith("log_beta"))


def test_detection_seeds_the_backbone_from_a_classification_checkpoint(scenes, image_folder,
                                                                         tmp_path):
    import imagenet
    from conftest import QUICK_TRAINING

    imagenet.main(["--model-kwargs", TINY_MODEL, *QUICK_TRAINING, "--epochs", "1",
                   "--data-dir", str(image_folder), "--output", str(tmp_path / "classifier")])
    classifier = torch.load(tmp_path / "classifier" / "best.pth", weights_only=True)["model"]
    detection.main(detection_quick(scenes / "coco", tmp_path / "detector", "--epochs", "1",
                                   "--pretrained", tmp_path / "classifier" / "best.pth"))
    log = (tmp_path / "detector" / "train.log").read_text()
    assert f"weights from {tmp_path / 'classifier' / 'best.pth'}" in log
    with pytest.raises(SystemExit, match="is a checkpoint of experiments/imagenet.py"):
        detection.main(["--resume", str(tmp_path / "classifier" / "best.pth")])
    assert classifier["stem.0.0.weight"].shape[0] == 4


def test_segmentation_trains_and_evaluates(scenes, tmp_path, capsys):
    segmentation.main(quick(scenes / "ade", tmp_path / "run", "--num-classes", "11",
                            "--crop-size", "64", "--base-size", "64"))
    assert re.search(r"after 2 epochs .*: mIoU [\d.]+, mAcc [\d.]+, aAcc [\d.]+ on ",
                     capsys.readouterr().out)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"mIoU", "mAcc", "aAcc"} <= set(results["final"]["eval"])
    metrics = segmentation.main(["--eval-only", "--checkpoint",
                                 str(tmp_path / "run" / "best.pth")])
    assert math.isclose(metrics["mIoU"], results["best"]["score"], abs_tol=1e-9)


def test_embedded_scenes_are_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTVIG_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr("attvig_pyg.data.scenes.DEFAULT_ROOT", tmp_path / "cache")
    args = segmentation.parse_args(["--scenes", "4", "2"])
    assert args.num_classes == len(SCENE_CLASSES) == 11
    root = segmentation.data_root(args)
    assert root.parent.parent == tmp_path / "cache" and (root / "images" / "training").is_dir()


def test_data_problems_are_named(scenes, tmp_path):
    # Detection: a missing annotation file, an image listed but absent.
    broken = tmp_path / "coco"
    (broken / "annotations").mkdir(parents=True)
    (broken / "train2017").mkdir()
    (broken / "val2017").mkdir()
    with pytest.raises(SystemExit):
        detection.parse_args(["--data-dir", str(broken)])
    for split in ("train2017", "val2017"):
        (broken / "annotations" / f"instances_{split}.json").write_text(
            (scenes / "coco" / "annotations" / f"instances_{split}.json").read_text())
    with pytest.raises(FileNotFoundError, match="image\\(s\\) listed in .* are absent from"):
        detection.main(detection_quick(broken, tmp_path / "run"))
    # Segmentation: a label map of the wrong size, a class id out of range.
    ade = tmp_path / "ade"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            (ade / kind / split).mkdir(parents=True)
            Image.new("RGB" if kind == "images" else "L", (32, 32)).save(
                ade / kind / split / "a.png")
    Image.new("L", (16, 32)).save(ade / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match="a label map of shape \\(32, 16\\) for an image of"):
        segmentation.main(quick(ade, tmp_path / "s1", "--num-classes", "3", "--crop-size", "32",
                                "--batch-size", "1"))
    Image.new("L", (32, 32), color=7).save(ade / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match="holds class id 7, outside 1..3"):
        segmentation.main(quick(ade, tmp_path / "s2", "--num-classes", "3", "--crop-size", "32",
                                "--batch-size", "1"))
