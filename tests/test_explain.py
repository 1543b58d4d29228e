"""Grad-CAM explanations on the fine-tuned model: shapes, batching, checkpoint round trip, CLI outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfake.checkpoint import load_model, save_model
from deepfake.cli import main
from deepfake.config import ModelConfig
from deepfake.data import SAMPLE_DIR
from deepfake.explain import cam_model, explain_images, write_explanations
from deepfake.images import decode_image
from deepfake.inference import Predictor
from deepfake.model import create_model, set_stem_stride


def sample_images(n: int = 6) -> list[Image.Image]:
    """Real CIFAKE pictures (both classes) plus resized copies of other sizes than the model's input."""
    files = sorted((SAMPLE_DIR / "FAKE").iterdir())[: n // 2] + sorted((SAMPLE_DIR / "REAL").iterdir())[: n // 2]
    imgs = [decode_image(p.read_bytes()) for p in files]
    return imgs + [imgs[0].resize((50, 40)), imgs[-1].resize((40, 50)), imgs[1].resize((64, 64))]


@pytest.fixture(scope="module")
def predictor(trained_model_dir) -> Predictor:
    return Predictor.from_dir(trained_model_dir, device="cpu")


def test_heatmaps_have_each_input_size_and_unit_range(predictor):
    imgs = sample_images()
    expls = explain_images(predictor, imgs, batch_size=4)
    assert len(expls) == len(imgs)
    verdicts = predictor.predict_images(imgs)
    for img, e, v in zip(imgs, expls, verdicts):
        assert e.cam.shape == (img.height, img.width) and e.cam.dtype == np.float32
        assert e.cam.min() >= 0.0 and e.cam.max() <= 1.0
        assert e.overlay.size == img.size and e.overlay.mode == "RGB"
        assert e.label == v["label"] and e.target == e.label
        assert e.prob_ai == pytest.approx(v["prob_ai"], abs=1e-5)
    square = [e.cam for img, e in zip(imgs, expls) if img.width == img.height]
    assert any(c.max() > 0.5 for c in square), "Grad-CAM degenerated to an empty map"
    wide = expls[len(imgs) - 3].cam  # 50x40: the model saw the central 40x40 square only
    assert wide[:, :5].max() == 0 and wide[:, 45:].max() == 0 and wide[:, 5:45].max() > 0


def test_batched_equals_one_at_a_time(predictor):
    imgs = sample_images()
    batched = explain_images(predictor, imgs, batch_size=len(imgs))
    single = [explain_images(predictor, [img], batch_size=1)[0] for img in imgs]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.cam, s.cam, atol=1e-3)
        assert b.label == s.label and b.prob_ai == pytest.approx(s.prob_ai, abs=1e-5)


def test_model_views_carry_what_the_model_reads_and_nothing_more(predictor):
    # What the server ships to its Explainer: the image as the model reads it. Its transform must be the
    # full image's transform (so the CAM is the same) and its size the model's, whatever the upload's.
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from deepfake.explain import model_views, view_cams

    imgs = sample_images() + [sample_images(2)[0].resize((900, 600), Image.Resampling.BICUBIC)]
    views = [model_views(predictor, img) for img in imgs]
    side = predictor.image_size
    for img, (v,) in zip(imgs, views):
        assert v.shape == (side, side, 3) and v.dtype == np.uint8
        assert torch.equal(predictor.transform(Image.fromarray(v)), predictor.transform(img))
    assert predictor.classes[0] == "ai"
    cams = view_cams(predictor, views, ["ai"] * len(imgs))
    cm = cam_model(predictor)
    with torch.enable_grad(), GradCAM(model=cm.model, target_layers=[cm.layer]) as cam:
        direct = cam(input_tensor=predictor.preprocess(imgs).clone(), targets=[ClassifierOutputTarget(0)] * len(imgs))
    for a, b in zip(cams, direct):
        assert a.shape == (side, side)
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        view_cams(predictor, views, ["ai"])


def test_fine_tuned_differs_from_random_weights(predictor, trained_model_dir):
    torch.manual_seed(123)
    meta = predictor.meta
    random_model = create_model(ModelConfig(arch=meta["arch"], stem_stride=meta.get("stem_stride")))
    random_pred = Predictor(random_model, meta, device="cpu")
    imgs = sample_images()
    trained = explain_images(predictor, imgs, target="ai")
    rand = explain_images(random_pred, imgs, target="ai")
    diff = np.mean([np.abs(a.cam - b.cam).mean() for a, b in zip(trained, rand)])
    assert diff > 0.05, diff


def test_same_cam_from_memory_and_from_saved_folder(trained_model_dir, tmp_path):
    model, meta = load_model(trained_model_dir)
    # Change what a careless save/load would lose: weights, BatchNorm statistics and the stem stride.
    set_stem_stride(model, 1)
    meta = {**meta, "stem_stride": 1}
    x = torch.stack([Predictor(model, meta, device="cpu").transform(img) for img in sample_images()])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    opt.step()
    model.eval()
    save_model(model, tmp_path / "m", meta)
    in_memory = Predictor(model, meta, device="cpu")
    from_disk = Predictor.from_dir(tmp_path / "m", device="cpu")
    imgs = sample_images()
    for a, b in zip(explain_images(in_memory, imgs), explain_images(from_disk, imgs)):
        assert np.array_equal(a.cam, b.cam)
        assert a.label == b.label and a.prob_ai == b.prob_ai


def test_target_choice_and_no_interference_with_inference(predictor):
    imgs = sample_images(4)
    before = predictor.predict_images(imgs)
    with torch.inference_mode():  # a server calling from an inference context still gets gradients
        as_ai = explain_images(predictor, imgs, target="ai")
    as_real = explain_images(predictor, imgs, target="real")
    assert {e.target for e in as_ai} == {"ai"} and {e.target for e in as_real} == {"real"}
    assert any(not np.allclose(a.cam, r.cam, atol=1e-3) for a, r in zip(as_ai, as_real))
    assert predictor.predict_images(imgs) == before
    cm = cam_model(predictor)
    assert cm.model is not predictor.model and cam_model(predictor) is cm  # a private copy, made once
    assert all(not m._forward_hooks for m in cm.model.modules())  # hooks released
    assert all(not m._forward_hooks for m in predictor.model.modules())
    with pytest.raises(ValueError, match="not a class"):
        explain_images(predictor, imgs, target="cat")


def test_write_explanations_unique_names(predictor, tmp_path):
    imgs = sample_images(2)[:2]
    expls = explain_images(predictor, imgs)
    res = write_explanations(expls, ["a/x.jpg", "b/x.jpg"], tmp_path)
    assert [r["stem"] for r in res["images"]] == ["x", "x_1"]
    assert (tmp_path / "x_1_overlay.png").is_file() and (tmp_path / "contact_sheet.png").is_file()


def test_explain_cli_writes_overlay_npy_and_contact_sheet(trained_model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    imgs = sample_images(2)
    imgs[0].save(src / "a.jpg")
    imgs[-3].save(src / "wide.png")  # 50x40
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    paths = [str(src / n) for n in ("a.jpg", "broken.jpg", "wide.png")] + [str(src / "missing.jpg")]
    rc = main(["explain", "--model", str(trained_model_dir), *paths, "-o", str(out), "--target", "ai"])
    assert rc == 0
    for stem, size in (("a", (32, 32)), ("wide", (40, 50))):
        assert Image.open(out / f"{stem}_overlay.png").size == size[::-1]
        cam = np.load(out / f"{stem}_cam.npy")
        assert cam.shape == size and 0 <= cam.min() and cam.max() <= 1
    assert Image.open(out / "contact_sheet.png").size[0] > 100
    assert not list(out.glob("broken*"))
    assert "not_an_image" in capsys.readouterr().out

    rc = main(["explain", "--model", str(trained_model_dir), str(src / "broken.jpg"), "-o", str(tmp_path / "o2")])
    assert rc == 2
    rc = main(["explain", "--model", str(trained_model_dir), str(src / "a.jpg"), "-o", str(out), "--target", "dog"])
    assert rc == 2


def test_explain_path_has_no_hidden_state_between_predictors(trained_model_dir):
    # Two predictors of the same folder get separate copies: explaining one never touches the other.
    p1 = Predictor.from_dir(Path(trained_model_dir), device="cpu")
    p2 = Predictor.from_dir(Path(trained_model_dir), device="cpu")
    assert cam_model(p1).model is not cam_model(p2).model
    imgs = sample_images(2)
    a, b = explain_images(p1, imgs), explain_images(p2, imgs)
    assert all(np.array_equal(x.cam, y.cam) for x, y in zip(a, b))
