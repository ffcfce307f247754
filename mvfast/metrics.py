"""Classification metrics: precision and recall (paper eq. 14–15, macro-averaged), top-1, top-5, mean class
accuracy, the confusion matrix, and video-level scores from multi-clip predictions.

Definitions (C classes, confusion matrix ``cm[true, predicted]``):

- precision_c = TP_c / (TP_c + FP_c) (eq. 14), recall_c = TP_c / (TP_c + FN_c) (eq. 15).
- ``precision`` is the mean of precision_c over the classes that occur in the targets or in the
  predictions; a class that occurs in the targets but is never predicted counts as precision 0.
- ``recall`` is the mean of recall_c over the classes that occur in the targets. This is also what is
  usually called mean class accuracy (or balanced accuracy), so ``mean_class_accuracy`` equals ``recall``;
  both are reported because the paper's tables and the action-recognition literature name them apart.
- ``top1`` / ``top5``: the fraction of samples whose label is among the 1 / 5 highest scores (top-k with k
  at least the number of classes is 1).

Everything is computed from counts (:class:`Accumulator`), so that shards of an evaluation (DataLoader
batches, DDP ranks) add up exactly.

Multi-label (each sample has any number of the C classes; scores are per-class sigmoids, targets multi-hot):

- ``ap`` of a class is its average precision over the samples ranked by score: the precision at each
  distinct score, weighted by the recall gained there, AP = sum_n (R_n - R_{n-1}) P_n (scikit-learn's and
  torchmetrics' definition, without interpolation; tied scores form one threshold). ``map`` is the mean AP of
  the classes with at least one positive (AP is undefined for the others, reported as None).
- At a threshold t (a class is predicted where its score >= t): per class TP, FP, FN; ``precision`` and
  ``recall`` are micro (from the counts summed over classes), ``micro_f1`` = 2 TP / (2 TP + FP + FN) of the
  summed counts, ``macro_f1`` the mean F1 of the classes that occur in the targets or the predictions (as for
  the single-label precision above).
- ``top1``: the fraction of samples with at least one label whose highest-scoring class is one of them.

These are written here rather than taken from torchmetrics: they come from counts that add up across DDP
ranks like the single-label ones, and AP is a sort per class; tests/test_metrics.py checks them against a
brute-force definition, and against torchmetrics where it is installed.
"""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64[C, C] counts, rows = true class, columns = predicted class.

    pred, target (int64[N]): class indices in [0, num_classes).
    """
    pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} has values outside [0, {num_classes})")
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def topk_correct(scores: torch.Tensor, target: torch.Tensor, k: int) -> int:
    """How many rows of scores (float[N, C]) have their target among the k highest."""
    if scores.shape[0] == 0:
        return 0
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (N, k)
    return int((top == target.reshape(-1, 1).to(top.device)).any(dim=1).sum())


def from_confusion(cm: torch.Tensor) -> dict[str, float]:
    """precision, recall, mean_class_accuracy and top1 from a confusion matrix (see the module doc)."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)  # true samples per class
    predicted = cm.sum(0)  # predictions per class
    present = support > 0
    seen = present | (predicted > 0)
    precision_c = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall_c = tp / support.clamp(min=1)
    total = cm.sum()
    recall = float(recall_c[present].mean()) if present.any() else 0.0
    return {
        "precision": float(precision_c[seen].mean()) if seen.any() else 0.0,
        "recall": recall,
        "mean_class_accuracy": recall,
        "top1": float(tp.sum() / total) if total > 0 else 0.0,
    }


class Accumulator:
    """Adds up a confusion matrix, top-5 hits and the loss over batches; :meth:`compute` gives the metrics.

    >>> acc = Accumulator(num_classes=10)
    >>> acc.update(logits, labels, loss=loss.item())   # loss: the batch mean
    >>> acc.compute()   # {"loss", "precision", "recall", "top1", "top5", "mean_class_accuracy", "count"}
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.top5 = 0
        self.loss_sum = 0.0
        self.count = 0

    def update(self, scores: torch.Tensor, target: torch.Tensor, loss: float | None = None) -> None:
        scores = scores.detach().float().cpu()
        target = target.detach().cpu()
        self.cm += confusion_matrix(scores.argmax(1), target, self.num_classes)
        self.top5 += topk_correct(scores, target, 5)
        if loss is not None:
            self.loss_sum += float(loss) * target.numel()
        self.count += target.numel()

    def state(self) -> torch.Tensor:
        """The counts as one float64 tensor (for all_reduce across DDP ranks)."""
        extra = torch.tensor([self.top5, self.loss_sum, self.count], dtype=torch.float64)
        return torch.cat([self.cm.double().reshape(-1), extra])

    def load_state(self, state: torch.Tensor) -> None:
        c = self.num_classes
        self.cm = state[: c * c].round().long().reshape(c, c)
        self.top5, self.loss_sum, self.count = int(state[-3]), float(state[-2]), int(state[-1])

    def compute(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / self.count if self.count else float("nan")}
        out.update(from_confusion(self.cm))
        out["top5"] = self.top5 / self.count if self.count else 0.0
        out["count"] = self.count
        return out


def classification_metrics(
    scores: torch.Tensor, target: torch.Tensor, num_classes: int, loss: float | None = None
) -> dict[str, float]:
    """Metrics of scores (float[N, C], logits or probabilities) against target (int64[N])."""
    acc = Accumulator(num_classes)
    acc.update(scores, target, loss)
    return acc.compute()


def video_level(
    probs: torch.Tensor, target: torch.Tensor, video_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Averages the clip probabilities of each video (test-time multi-clip averaging).

    probs (float[N, C]) per clip, target (int64[N]), video_index (int64[N]): which video each clip is of.
    Returns the per-video mean probabilities (float[V, C]), labels (int64[V]; multi-hot int64[V, C] for a
    multi-hot target[N, C]) and the video indices (int64[V], sorted), V = number of distinct videos.
    """
    videos, inverse = torch.unique(video_index.cpu(), sorted=True, return_inverse=True)
    V, C = videos.numel(), probs.shape[1]
    sums = torch.zeros(V, C, dtype=torch.float64).index_add_(0, inverse, probs.detach().cpu().double())
    counts = torch.bincount(inverse, minlength=V).double().unsqueeze(1)
    # (V,) class indices, or (V, C) multi-hot labels
    labels = torch.zeros((V, *target.shape[1:]), dtype=torch.long)
    labels[inverse] = target.cpu().long()
    return (sums / counts).float(), labels, videos


# ---------------------------------------------------------------------------------------------------------
# Multi-label


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64[C]: the AP of each class (see the module doc), NaN for a class without positives.

    scores (float[N, C]), target (multi-hot int or bool[N, C]).
    """
    scores, target = scores.detach().double().cpu(), target.detach().cpu().bool()
    if scores.shape != target.shape or scores.dim() != 2:
        raise ValueError(
            f"average_precision: scores {tuple(scores.shape)} and target {tuple(target.shape)} must both be "
            "(N, C)"
        )
    N, C = scores.shape
    out = torch.full((C,), float("nan"), dtype=torch.float64)
    for c in range(C):
        positives = int(target[:, c].sum())
        if positives == 0:
            continue
        order = scores[:, c].argsort(descending=True, stable=True)
        s, t = scores[order, c], target[order, c].double()
        tp, seen = t.cumsum(0), torch.arange(1, N + 1, dtype=torch.float64)
        # the last sample of each run of tied scores: one threshold
        last = torch.ones(N, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        tp, seen = tp[last], seen[last]
        recall = tp / positives
        gained = torch.diff(recall, prepend=recall.new_zeros(1))
        out[c] = (gained * tp / seen).sum()
    return out


class MultiLabelAccumulator:
    """Adds up per-class TP, FP, FN at a threshold, top-1 hits and the loss over batches (multi-label); the
    counterpart of :class:`Accumulator`, with :meth:`state` for all_reduce. mAP needs every score and is
    computed by :func:`multilabel_metrics` instead.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5):
        self.num_classes, self.threshold = num_classes, threshold
        self.counts = torch.zeros(3, num_classes, dtype=torch.float64)  # TP, FP, FN per class
        self.top1 = 0
        self.labelled = 0  # samples with at least one label
        self.loss_sum = 0.0
        self.count = 0

    def update(self, scores: torch.Tensor, target: torch.Tensor, loss: float | None = None) -> None:
        """scores (float[N, C]): probabilities (sigmoids, compared with the threshold); target: multi-hot
        (N, C); loss: the batch mean."""
        scores = scores.detach().float().cpu()
        target = target.detach().cpu().bool()
        predicted = scores >= self.threshold
        self.counts[0] += (predicted & target).sum(0).double()
        self.counts[1] += (predicted & ~target).sum(0).double()
        self.counts[2] += (~predicted & target).sum(0).double()
        has = target.any(1)
        if scores.shape[0]:
            best = scores.argmax(1)
            self.top1 += int((target[torch.arange(len(best)), best] & has).sum())
        self.labelled += int(has.sum())
        if loss is not None:
            self.loss_sum += float(loss) * target.shape[0]
        self.count += target.shape[0]

    def state(self) -> torch.Tensor:
        extra = torch.tensor([self.top1, self.labelled, self.loss_sum, self.count], dtype=torch.float64)
        return torch.cat([self.counts.reshape(-1), extra])

    def load_state(self, state: torch.Tensor) -> None:
        C = self.num_classes
        self.counts = state[: 3 * C].reshape(3, C).clone()
        self.top1, self.labelled = int(state[-4]), int(state[-3])
        self.loss_sum, self.count = float(state[-2]), int(state[-1])

    def compute(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / self.count if self.count else float("nan")}
        out.update(f1_scores(self.counts))
        out["top1"] = self.top1 / self.labelled if self.labelled else 0.0
        out["count"] = self.count
        return out


def f1_scores(counts: torch.Tensor) -> dict[str, float]:
    """precision, recall (micro), micro_f1 and macro_f1 of per-class counts (float[3, C]: TP, FP, FN)."""
    tp, fp, fn = counts.double()
    TP, FP, FN = float(tp.sum()), float(fp.sum()), float(fn.sum())
    seen = (tp + fp + fn) > 0
    f1_c = 2 * tp / (2 * tp + fp + fn).clamp(min=1e-300)
    return {
        "precision": TP / (TP + FP) if TP + FP else 0.0,
        "recall": TP / (TP + FN) if TP + FN else 0.0,
        "micro_f1": 2 * TP / (2 * TP + FP + FN) if TP + FP + FN else 0.0,
        "macro_f1": float(f1_c[seen].mean()) if seen.any() else 0.0,
    }


def multilabel_metrics(
    scores: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, loss: float | None = None
) -> dict:
    """The multi-label metrics (see the module doc) of scores (probabilities, float[N, C]) against a
    multi-hot target (N, C): loss, map, micro_f1, macro_f1, precision, recall, top1, count, and per_class
    (lists over the classes: ap (None where undefined), f1, precision, recall, support)."""
    acc = MultiLabelAccumulator(scores.shape[1], threshold)
    acc.update(scores, target, loss)
    out = acc.compute()
    ap = average_precision(scores, target)
    defined = ~ap.isnan()
    out["map"] = float(ap[defined].mean()) if defined.any() else 0.0
    tp, fp, fn = acc.counts
    out["per_class"] = {
        "ap": [None if v != v else float(v) for v in ap.tolist()],
        "f1": (2 * tp / (2 * tp + fp + fn).clamp(min=1e-300)).tolist(),
        "precision": (tp / (tp + fp).clamp(min=1e-300)).tolist(),
        "recall": (tp / (tp + fn).clamp(min=1e-300)).tolist(),
        "support": (tp + fn).long().tolist(),
    }
    return out
