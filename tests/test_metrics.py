"""mvfast.metrics against values computed by hand."""

import pytest
import torch

from mvfast.metrics import (
    Accumulator,
    classification_metrics,
    confusion_matrix,
    from_confusion,
    topk_correct,
    video_level,
)


def test_confusion_matrix_counts():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_precision_recall_by_hand():
    # cm rows = true, columns = predicted:
    #   class 0: TP 1, FP 0 (column 0 = 1), FN 1 (row 0 = 2)  -> P 1,   R 1/2
    #   class 1: TP 1, FP 1 (column 1 = 2), FN 0 (row 1 = 1)  -> P 1/2, R 1
    #   class 2: TP 2, FP 1 (column 2 = 3), FN 1 (row 2 = 3)  -> P 2/3, R 2/3
    cm = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 1, 2]])
    m = from_confusion(cm)
    assert m["precision"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert m["mean_class_accuracy"] == m["recall"]
    assert m["top1"] == pytest.approx(4 / 6)


def test_absent_and_never_predicted_classes():
    # Class 2 never occurs and is never predicted: left out of both means.
    # Class 1 occurs (2 samples) but is never predicted: precision 0, recall 0.
    pred = torch.tensor([0, 0, 0, 3])
    target = torch.tensor([0, 1, 1, 3])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 4).float(), target, 4)
    # precision: class 0: 1/3, class 1: 0, class 3: 1 -> mean over {0, 1, 3}
    assert m["precision"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    # recall: class 0: 1, class 1: 0, class 3: 1 -> mean over the classes with samples {0, 1, 3}
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["top1"] == pytest.approx(2 / 4)
    # A class that is predicted but never occurs counts in precision (as 0), not in recall.
    m = classification_metrics(
        torch.nn.functional.one_hot(torch.tensor([2, 0]), 3).float(), torch.tensor([0, 0]), 3
    )
    assert m["precision"] == pytest.approx((1 + 0) / 2)
    assert m["recall"] == pytest.approx(1 / 2)


def test_topk():
    scores = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0 is ranked 6th
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4 is ranked 5th
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 1 is ranked 1st
        ]
    )
    target = torch.tensor([0, 4, 1])
    assert topk_correct(scores, target, 1) == 1
    assert topk_correct(scores, target, 5) == 2
    assert topk_correct(scores[:, :3], torch.tensor([0, 2, 1]), 5) == 3  # k >= C: every row counts
    m = classification_metrics(scores, target, 6, loss=2.0)
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)
    assert m["loss"] == 2.0 and m["count"] == 3


def test_accumulator_adds_up_batches_and_round_trips_its_state():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=g)
    target = torch.randint(0, 7, (50,), generator=g)
    whole = classification_metrics(scores, target, 7, loss=1.5)
    acc = Accumulator(7)
    for i in range(0, 50, 16):
        acc.update(scores[i : i + 16], target[i : i + 16], loss=1.5)
    parts = acc.compute()
    assert parts == pytest.approx(whole)
    other = Accumulator(7)
    other.load_state(acc.state())
    assert other.compute() == pytest.approx(whole)
    assert Accumulator(3).compute()["count"] == 0


def test_video_level_averages_clips():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    target = torch.tensor([0, 0, 0, 1, 1])
    video = torch.tensor([7, 7, 7, 2, 2])
    vp, vt, vi = video_level(probs, target, video)
    assert vi.tolist() == [2, 7] and vt.tolist() == [1, 0]
    torch.testing.assert_close(
        vp, torch.tensor([[0.55, 0.45], [(0.9 + 0.2 + 0.3) / 3, (0.1 + 0.8 + 0.7) / 3]])
    )
    # clip level: only the first clip is right; video level: 7 -> class 1, 2 -> class 0, both wrong
    assert classification_metrics(probs, target, 2)["top1"] == pytest.approx(1 / 5)
    assert classification_metrics(vp, vt, 2)["top1"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Multi-label


def brute_force_ap(scores, target):
    """AP by its definition: the mean over a class's positives of the precision among the samples scored at
    least as high as that positive."""
    out = []
    for c in range(scores.shape[1]):
        s, t = scores[:, c].tolist(), target[:, c].tolist()
        positives = [x for x, y in zip(s, t, strict=True) if y]
        if not positives:
            out.append(float("nan"))
            continue
        precisions = []
        for x in positives:
            above = [y for v, y in zip(s, t, strict=True) if v >= x]
            precisions.append(sum(above) / len(above))
        out.append(sum(precisions) / len(precisions))
    return torch.tensor(out, dtype=torch.float64)


def random_multilabel(seed, N=40, C=6, ties=False):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(N, C, generator=g) < 0.3
    target[0] = True  # every class has a positive
    scores = (torch.rand(N, C, generator=g) + 0.6 * target).clamp(max=1) / 1.0
    if ties:
        scores = (scores * 4).round() / 4  # many tied scores
    return scores, target


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_by_its_definition(ties):
    from mvfast.metrics import average_precision

    for seed in range(5):
        scores, target = random_multilabel(seed, ties=ties)
        torch.testing.assert_close(average_precision(scores, target), brute_force_ap(scores, target))
    # a class without positives: undefined
    ap = average_precision(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[1, 0], [0, 0]]))
    assert ap[0] == 1.0 and ap[1].isnan()


def test_f1_at_a_threshold_by_hand():
    from mvfast.metrics import MultiLabelAccumulator, multilabel_metrics

    scores = torch.tensor([[0.9, 0.6, 0.1], [0.4, 0.7, 0.2], [0.8, 0.3, 0.55]])
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    # predicted at 0.5: [[1,1,0],[0,1,0],[1,0,1]]
    #   class 0: TP 1 FP 1 FN 1 -> F1 1/2;  class 1: TP 1 FP 1 FN 0 -> F1 2/3;  class 2: TP 0 FP 1 -> F1 0
    m = multilabel_metrics(scores, target, threshold=0.5, loss=0.25)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 1))
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == pytest.approx(2 / 3)
    # the labelled samples' best classes (0 and 1) are labels; the unlabelled third does not count
    assert m["top1"] == 1.0
    assert m["per_class"]["support"] == [2, 1, 0] and m["per_class"]["ap"][2] is None
    assert m["loss"] == 0.25 and m["count"] == 3
    assert m["map"] == pytest.approx((brute_force_ap(scores, target)[:2]).mean().item())
    # counts add up over shards, as across DDP ranks
    a, b = MultiLabelAccumulator(3), MultiLabelAccumulator(3)
    a.update(scores[:1], target[:1], 0.1)
    b.update(scores[1:], target[1:], 0.3)
    a.load_state(a.state() + b.state())
    whole = a.compute()
    for key in ("micro_f1", "macro_f1", "precision", "recall", "top1", "count"):
        assert whole[key] == pytest.approx(m[key]), key


def test_multilabel_metrics_agree_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification", reason="torchmetrics not installed")
    from mvfast.metrics import average_precision, multilabel_metrics

    for seed, ties in ((0, False), (1, True), (2, False)):
        scores, target = random_multilabel(seed, N=64, C=5, ties=ties)
        C = target.shape[1]
        theirs = tm.multilabel_average_precision(scores, target.long(), C, average=None)
        torch.testing.assert_close(average_precision(scores, target).float(), theirs, rtol=1e-5, atol=1e-6)
        m = multilabel_metrics(scores, target, threshold=0.4)
        micro = tm.multilabel_f1_score(scores, target.long(), C, threshold=0.4, average="micro")
        macro = tm.multilabel_f1_score(scores, target.long(), C, threshold=0.4, average="macro")
        assert m["micro_f1"] == pytest.approx(float(micro), abs=1e-6)
        assert m["macro_f1"] == pytest.approx(float(macro), abs=1e-6)


def test_video_level_of_multi_hot_labels():
    probs = torch.tensor([[0.2, 0.9], [0.4, 0.7], [0.8, 0.1]])
    target = torch.tensor([[0, 1], [0, 1], [1, 0]])
    vp, vl, videos = video_level(probs, target, torch.tensor([5, 5, 2]))
    assert videos.tolist() == [2, 5] and vl.tolist() == [[1, 0], [0, 1]]
    torch.testing.assert_close(vp, torch.tensor([[0.8, 0.1], [0.3, 0.8]]))
