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
    Returns the per-video mean probabilities (float[V, C]), labels (int64[V]) and the video indices (int64[V],
    sorted), V = number of distinct videos.
    """
    videos, inverse = torch.unique(video_index.cpu(), sorted=True, return_inverse=True)
    V, C = videos.numel(), probs.shape[1]
    sums = torch.zeros(V, C, dtype=torch.float64).index_add_(0, inverse, probs.detach().cpu().double())
    counts = torch.bincount(inverse, minlength=V).double().unsqueeze(1)
    labels = torch.zeros(V, dtype=torch.long)
    labels[inverse] = target.cpu().long()
    return (sums / counts).float(), labels, videos
