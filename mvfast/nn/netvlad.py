"""``mvfast.nn.NetVLAD``: the module over :func:`mvfast.ops.netvlad`, with k-means initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mvfast.ops import netvlad


class NetVLAD(nn.Module):
    """NetVLAD pooling (paper eq. 7-9) of a set of local features into one descriptor.

    Args:
        dim: D, the size of each local feature.
        clusters: K, the number of clusters.
        ghost_clusters: G, extra clusters that take assignment weight and are dropped (for noisy
            features), as in NeXtVLAD / "ghost" NetVLAD.
        normalize: intra-normalise per cluster, flatten, then L2-normalise (output (B, K*D)); without,
            the output is the raw (B, K, D) aggregate.

    Shape:
        x (Tensor[B, M, D]), mask (Tensor[B, M], bool, True = valid, optional) -> Tensor[B, K*D]
        (or Tensor[B, K, D] without ``normalize``).

    Initialisation: random (centroids ~ N(0, 1/D), assignment weights as nn.Linear), or from data with
    :meth:`init_from_data` (k-means on a sample of local features, as in the NetVLAD paper).
    """

    def __init__(
        self,
        dim: int,
        clusters: int,
        ghost_clusters: int = 0,
        normalize: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v, least in (
            ("dim", dim, 1),
            ("clusters", clusters, 1),
            ("ghost_clusters", ghost_clusters, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"NetVLAD: {name} must be an int >= {least}, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.clusters, self.ghost_clusters, self.normalize = (
            dim,
            clusters,
            ghost_clusters,
            normalize,
        )
        self.weight = nn.Parameter(torch.empty(clusters + ghost_clusters, dim, **factory))
        self.bias = nn.Parameter(torch.empty(clusters + ghost_clusters, **factory))
        self.centroids = nn.Parameter(torch.empty(clusters, dim, **factory))
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.clusters * self.dim

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.centroids, std=bound)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return netvlad(
            x,
            self.weight,
            self.bias,
            self.centroids,
            mask,
            ghost_clusters=self.ghost_clusters,
            normalize=self.normalize,
        )

    @torch.no_grad()
    def init_from_data(
        self,
        features: Tensor,
        mask: Tensor | None = None,
        *,
        iters: int = 25,
        max_samples: int = 20000,
        generator: torch.Generator | None = None,
    ) -> NetVLAD:
        """Set centroids by k-means on local features and the assignment to match them.

        The assignment becomes the soft nearest-centroid rule of the NetVLAD paper: logits
        -alpha |x - c_k|^2 (+ a term constant over k), i.e. weight = 2 alpha c, bias = -alpha |c|^2,
        with alpha chosen so that a typical feature's nearest centroid gets 100x the weight of the
        second nearest. Ghost clusters get no data-driven centroid: zero weight and the mean bias.

        Args:
            features (Tensor[N, D] or Tensor[B, M, D]): sample of local features.
            mask (Tensor[B, M], bool, optional): valid features when ``features`` is 3-D.
            iters: Lloyd iterations after k-means++ seeding.
            max_samples: at most this many features are used (a random subset).
            generator: for reproducible seeding and sub-sampling.
        Returns: self.
        """
        K, D = self.clusters, self.dim
        if features.dim() == 3:
            if mask is not None:
                if mask.shape != features.shape[:2]:
                    raise ValueError(
                        f"NetVLAD.init_from_data: mask must have shape {tuple(features.shape[:2])}, "
                        f"got {tuple(mask.shape)}"
                    )
                features = features[mask]
            else:
                features = features.reshape(-1, features.shape[-1])
        if features.dim() != 2 or features.shape[1] != D:
            raise ValueError(
                f"NetVLAD.init_from_data: features must be (N, {D}) or (B, M, {D}), "
                f"got {tuple(features.shape)}"
            )
        if features.shape[0] < K:
            raise ValueError(
                f"NetVLAD.init_from_data: need at least clusters={K} features, got {features.shape[0]}"
            )
        dev = features.device
        pts = features.double()
        if pts.shape[0] > max_samples:
            pick = torch.randperm(pts.shape[0], generator=generator, device="cpu")[:max_samples]
            pts = pts[pick.to(dev)]
        cent = _kmeans_pp(pts, K, generator)
        for _ in range(iters):
            nearest = torch.cdist(pts, cent).argmin(1)
            sums = torch.zeros_like(cent).index_add_(0, nearest, pts)
            counts = torch.bincount(nearest, minlength=K).unsqueeze(1).to(pts.dtype)
            # an emptied cluster keeps its centre rather than collapsing to the origin
            cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        d2 = torch.cdist(pts, cent).pow(2)
        if K > 1:
            two = d2.topk(2, dim=1, largest=False).values
            gap = (two[:, 1] - two[:, 0]).median().clamp_min(1e-12)
            alpha = math.log(100.0) / gap.item()
        else:
            alpha = 1.0
        sq = cent.pow(2).sum(1)
        self.centroids.copy_(cent)
        self.weight[:K].copy_(2 * alpha * cent)
        self.bias[:K].copy_(-alpha * sq)
        if self.ghost_clusters:
            self.weight[K:].zero_()
            self.bias[K:].fill_((-alpha * sq).mean().item())
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, clusters={self.clusters}, ghost_clusters={self.ghost_clusters}, "
            f"normalize={self.normalize}"
        )


def _kmeans_pp(pts: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance
    to the nearest centre chosen so far."""
    n = pts.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    cent = [pts[first]]
    d2 = (pts - pts[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = d2.cpu() / d2.sum().cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=pts.dtype)
        nxt = torch.multinomial(probs, 1, generator=generator).item()
        cent.append(pts[nxt])
        d2 = torch.minimum(d2, (pts - pts[nxt]).pow(2).sum(1))
    return torch.stack(cent)
