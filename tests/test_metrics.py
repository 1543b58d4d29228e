"""Metrics against numbers worked out by hand on a fixed toy prediction set."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from deepfake import metrics as mt

# 5 ai + 5 real; at threshold 0.5: TP 3 (0.95, 0.85, 0.65), FN 2 (0.45, 0.15), FP 1 (0.75), TN 4.
Y = ["ai"] * 5 + ["real"] * 5
P = [0.95, 0.85, 0.65, 0.45, 0.15, 0.75, 0.35, 0.25, 0.12, 0.05]


def pairwise_auc(y, p):
    """P(score of a random ai > score of a random real), ties count one half: the definition of ROC-AUC."""
    pos = [s for label, s in zip(y, p) if label == "ai"]
    neg = [s for label, s in zip(y, p) if label == "real"]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_one_class_list_for_the_model_the_data_and_the_metrics():
    from deepfake import labels, model

    assert mt.CLASSES is labels.CLASSES is model.CLASSES and labels.CLASSES[0] == mt.POSITIVE == "ai"


def test_toy_set_matches_hand_computed_values():
    m = mt.compute_metrics(Y, P, n_bootstrap=0)
    tp, fn, fp, tn = 3, 2, 1, 4
    assert m["n"] == 10 and m["threshold"] == 0.5 and m["support"] == {"ai": 5, "real": 5}
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)
    assert m["confusion_matrix"]["labels"] == ["ai", "real"]
    assert m["confusion_matrix"]["matrix"] == [[tp, fn], [fp, tn]]  # rows true, columns predicted
    ai, real = m["per_class"]["ai"], m["per_class"]["real"]
    assert ai["precision"] == pytest.approx(tp / (tp + fp)) and ai["recall"] == pytest.approx(tp / (tp + fn))
    assert real["precision"] == pytest.approx(tn / (tn + fn)) and real["recall"] == pytest.approx(tn / (tn + fp))
    f1_ai, f1_real = 2 * 0.75 * 0.6 / (0.75 + 0.6), 2 * (4 / 6) * 0.8 / (4 / 6 + 0.8)
    assert ai["f1"] == pytest.approx(f1_ai) and real["f1"] == pytest.approx(f1_real)
    assert m["f1_macro"] == pytest.approx((f1_ai + f1_real) / 2)
    assert m["precision_macro"] == pytest.approx((0.75 + 4 / 6) / 2)
    # 20 of the 25 (ai, real) pairs are ranked the right way round
    assert pairwise_auc(Y, P) == pytest.approx(0.8)
    assert m["roc_auc"] == pytest.approx(0.8)
    # ranked: ai ai real ai ai real real ai ... -> precision at each ai: 1, 1, 3/4, 4/5, 5/8; recall steps 0.2
    assert m["average_precision"] == pytest.approx(0.2 * (1 + 1 + 0.75 + 0.8 + 5 / 8))
    # bins of 0.1 (right-closed): only (0.1, 0.2] holds two images (0.15 ai, 0.12 real): |0.5 - 0.135|
    gaps = [0.05, 0.15, 0.75, 0.35, 0.55, 0.35, 0.25, 0.05] + [abs(0.5 - 0.135)] * 2
    assert m["ece"] == pytest.approx(sum(gaps) / 10)
    assert sum(b["count"] for b in m["calibration"]) == 10 and m["calibration"][1]["count"] == 2
    ys = [1] * 5 + [0] * 5
    assert m["brier"] == pytest.approx(np.mean([(p - y) ** 2 for p, y in zip(P, ys)]))
    assert m["notes"] == []


def test_indices_and_case_are_accepted_and_threshold_is_honoured():
    by_index = mt.compute_metrics([0] * 5 + [1] * 5, P, n_bootstrap=0)  # indices in CLASSES order: 0 = ai
    by_name = mt.compute_metrics([s.upper() for s in Y], P, n_bootstrap=0)
    assert by_index["confusion_matrix"] == by_name["confusion_matrix"]
    assert by_index["accuracy"] == by_name["accuracy"] == pytest.approx(0.7)
    high = mt.compute_metrics(Y, P, threshold=0.8, n_bootstrap=0)  # ai only for 0.95, 0.85
    assert high["threshold"] == 0.8 and high["confusion_matrix"]["matrix"] == [[2, 3], [0, 5]]
    assert high["roc_auc"] == pytest.approx(0.8)  # threshold-free
    # at exactly the threshold the verdict is ai, like the model's argmax (ai is output 0)
    assert mt.compute_metrics(["ai"], [0.5], n_bootstrap=0)["accuracy"] == 1.0


def test_wilson_interval_for_accuracy():
    m = mt.compute_metrics(Y, P, n_bootstrap=0)
    ref = binomtest(7, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert m["accuracy_ci"] == pytest.approx([ref.low, ref.high])
    assert m["accuracy_ci"] == pytest.approx([0.3968, 0.8922], abs=1e-4)
    lo, hi = mt.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.65 < lo < 0.75  # never a zero-width interval at 100 %


def test_auc_by_ranks_handles_ties_like_the_definition():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60), 1)  # many ties
    labels = ["ai" if v else "real" for v in y]
    assert mt.auc_by_ranks(y, p)[0] == pytest.approx(pairwise_auc(labels, p))
    assert mt.auc_by_ranks(y, p)[0] == pytest.approx(roc_auc_score(y, p))


def test_bootstrap_interval_is_seeded_and_matches_resampling_by_hand():
    a = mt.compute_metrics(Y, P, n_bootstrap=300, seed=5)
    b = mt.compute_metrics(Y, P, n_bootstrap=300, seed=5)
    c = mt.compute_metrics(Y, P, n_bootstrap=300, seed=6)
    assert a["roc_auc_ci"] == b["roc_auc_ci"] and a["roc_auc_ci"] != c["roc_auc_ci"]
    lo, hi = a["roc_auc_ci"]
    assert lo < a["roc_auc"] < hi
    # the same resamples scored with sklearn, one by one
    y = np.array([1] * 5 + [0] * 5)
    idx = np.random.default_rng(5).integers(0, 10, size=(300, 10))
    aucs = [roc_auc_score(y[i], np.array(P)[i]) for i in idx if 0 < y[i].sum() < 10]
    assert a["roc_auc_bootstrap"]["valid_resamples"] == len(aucs)
    assert [lo, hi] == pytest.approx(list(np.quantile(aucs, [0.025, 0.975])))
    # with 4 images about 1 resample in 8 holds one class only: dropped and counted, not a crash
    tiny = mt.compute_metrics(["ai", "ai", "real", "real"], [0.9, 0.4, 0.6, 0.1], n_bootstrap=400)
    assert 300 < tiny["roc_auc_bootstrap"]["valid_resamples"] < 390


def test_single_class_is_reported_not_a_crash(tmp_path):
    m = mt.compute_metrics(["ai"] * 4, [0.9, 0.8, 0.3, 0.6])
    assert m["roc_auc"] is None and m["average_precision"] is None and m["roc_auc_ci"] is None
    assert m["notes"] and "only one class" in m["notes"][0]
    assert m["accuracy"] == 0.75 and m["confusion_matrix"]["matrix"] == [[3, 1], [0, 0]]
    files = mt.write_plots(["ai"] * 4, [0.9, 0.8, 0.3, 0.6], tmp_path, m)
    assert all(Image.open(f).format == "PNG" for f in files.values())


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of"):
        mt.compute_metrics(["ai", "cat"], [0.1, 0.2])
    with pytest.raises(ValueError, match="within"):
        mt.compute_metrics(["ai", "real"], [0.1, 1.2])
    with pytest.raises(ValueError, match="2 labels but 3"):
        mt.compute_metrics(["ai", "real"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no predictions"):
        mt.compute_metrics([], [])


def test_plots_are_valid_pngs(tmp_path):
    m = mt.compute_metrics(Y, P, n_bootstrap=0)
    files = mt.write_plots(Y, P, tmp_path / "plots", m)
    assert set(files) == {"confusion_matrix", "roc", "reliability"}
    for f in files.values():
        raw = open(f, "rb").read()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(f) as img:
            img.load()
            assert img.width > 200 and img.height > 200
            # not a blank canvas: a real plot has many distinct colours
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    assert not math.isnan(m["ece"])
