"""Motion fields: the codec's motion vectors rasterised into a dense 2-channel flow, and an RGB-difference
(Lucas-Kanade) flow for frames that carry no vectors.

Units and sign: a field holds the forward displacement (dx, dy) in pixels of the field's own resolution, per
source frame, of the content at each pixel: an object moving right gives dx > 0, moving down gives dy > 0.

FFmpeg exports, per block, ``src = dst + motion / motion_scale`` where ``dst`` is the block centre in the
current frame and ``src`` the matching position in the reference frame (``source`` < 0: a past frame, > 0: a
future one). Forward flow is therefore ``-motion / motion_scale`` for past references and
``+motion / motion_scale`` for future ones, divided by the distance to the reference in frames. FFmpeg does
not export that distance, so it is estimated from the picture types: a past reference is the previous I or P
frame in display order, a future one the next (see :func:`reference_distances`). That is exact for P-frames
with one reference frame and for B-frames without pyramids; a B-frame that references a B-pyramid's middle
frame, or a P-frame that references an older frame, gets a flow too small or too large by that ratio.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Cached motion is int8 in quarter pixels: +-31.75 px per frame at the cached resolution, far beyond what the
# codec searches at 128 px, and a quarter of the float32 size on disk.
MOTION_QUANT = 4.0

MV_FIELDS = ("source", "w", "h", "dst_x", "dst_y", "motion_x", "motion_y", "motion_scale")


def reference_distances(pict_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimated distance, in frames, from each frame to its past and its future reference.

    Args:
        pict_types (int[N]): picture type of each frame in display order (1 I, 2 P, 3 B, as
            ``av.video.frame.PictureType``; other values count as anchors like I and P).

    Returns:
        past, future (int[N]): distance to the previous / next anchor (I or P frame), at least 1.
    """
    pict_types = np.asarray(pict_types)
    n = pict_types.size
    idx = np.arange(n)
    anchor = pict_types != 3
    prev_anchor = np.maximum.accumulate(np.where(anchor, idx, -1))
    # The anchor before frame i is prev_anchor[i - 1] (for an anchor itself, its own index does not count).
    before = np.concatenate([[-1], prev_anchor[:-1]])
    next_anchor = np.minimum.accumulate(np.where(anchor, idx, n)[::-1])[::-1]
    after = np.concatenate([next_anchor[1:], [n]])
    past = np.where(before >= 0, idx - before, 1)
    future = np.where(after < n, after - idx, 1)
    return np.maximum(past, 1), np.maximum(future, 1)


def codec_vectors(
    mvs: np.ndarray, past_distance: int = 1, future_distance: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and forward flow of exported motion vectors.

    Args:
        mvs: structured array of AVMotionVector (``frame.side_data["MOTION_VECTORS"].to_ndarray()``).
        past_distance, future_distance: frames between this frame and its past / future reference; vectors
            are divided by them to give motion per frame.

    Returns:
        boxes (float64[N, 4]): x0, y0, x1, y1 of each block in source pixels (x1, y1 exclusive).
        flow (float32[N, 2]): forward displacement (dx, dy) in source pixels per frame.
    """
    missing = [f for f in MV_FIELDS if mvs.dtype.names is None or f not in mvs.dtype.names]
    if missing:
        raise ValueError(
            f"codec_vectors: mvs must be a structured AVMotionVector array, missing fields {missing}"
        )
    scale = mvs["motion_scale"].astype(np.float32)
    scale[scale == 0] = 1.0
    # Forward flow per frame: -motion / distance for past references, +motion / distance for future ones.
    sign = np.where(mvs["source"] < 0, -1.0 / past_distance, 1.0 / future_distance).astype(np.float32)
    flow = np.stack([sign * mvs["motion_x"] / scale, sign * mvs["motion_y"] / scale], axis=1)
    w = mvs["w"].astype(np.float64)
    h = mvs["h"].astype(np.float64)
    x0 = mvs["dst_x"] - w / 2
    y0 = mvs["dst_y"] - h / 2
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    return boxes, flow.astype(np.float32)


def rasterize(
    boxes: np.ndarray, flow: np.ndarray, frame: np.ndarray, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint block vectors into dense fields, all frames at once, without a loop over blocks.

    Each box is snapped outwards to whole pixels (so a block smaller than a pixel after downscaling still
    lands somewhere) and clipped to the field. Where boxes overlap (bidirectional blocks, snapped edges)
    their vectors are averaged. A 2-D difference array per frame and channel takes +v / -v at the four
    corners of every box (one scatter-add for all of them); two cumulative sums turn it into the
    painted field, so the cost is O(blocks + frames * H * W).

    Args:
        boxes (float[N, 4]): x0, y0, x1, y1 in output pixels.
        flow (float[N, 2]): dx, dy of each box.
        frame (int[N]): output frame of each box, in [0, num_frames).

    Returns:
        field (float32[num_frames, 2, height, width]) and coverage (int32[num_frames, height, width]), the
        number of boxes over each pixel (0 where no vector landed; the field is 0 there).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    flow = np.asarray(flow, dtype=np.float64).reshape(-1, 2)
    frame = np.asarray(frame, dtype=np.int64).reshape(-1)
    if not (boxes.shape[0] == flow.shape[0] == frame.shape[0]):
        raise ValueError(
            f"rasterize: boxes, flow and frame must have the same length, got {boxes.shape[0]}, "
            f"{flow.shape[0]} and {frame.shape[0]}"
        )
    if frame.size and (frame.min() < 0 or frame.max() >= num_frames):
        raise ValueError(
            f"rasterize: frame indices must be in [0, {num_frames}), got range [{frame.min()}, {frame.max()}]"
        )
    x0 = np.clip(np.floor(boxes[:, 0]), 0, width).astype(np.int64)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, height).astype(np.int64)
    x1 = np.clip(np.ceil(boxes[:, 2]), 0, width).astype(np.int64)
    y1 = np.clip(np.ceil(boxes[:, 3]), 0, height).astype(np.int64)
    keep = (x1 > x0) & (y1 > y0)
    x0, y0, x1, y1, frame, flow = x0[keep], y0[keep], x1[keep], y1[keep], frame[keep], flow[keep]

    row = width + 1
    plane = (height + 1) * row
    base = frame * plane
    # The four corners of each box, with the sign each takes in the difference array.
    corners = np.concatenate(
        [base + y0 * row + x0, base + y0 * row + x1, base + y1 * row + x0, base + y1 * row + x1]
    )
    signs = np.repeat(np.array([1.0, -1.0, -1.0, 1.0]), x0.size)
    # Channels count, dx, dy stacked along one flat index so a single bincount fills all three.
    size = num_frames * plane
    index = np.concatenate([corners, corners + size, corners + 2 * size])
    weights = np.concatenate([signs, signs * np.tile(flow[:, 0], 4), signs * np.tile(flow[:, 1], 4)])
    # torch for the scatter and the cumulative sums: its cumsum is about 10x faster than NumPy's here, and
    # float32 is exact for the counts and for the quarter-pel vectors of every codec.
    diff = torch.zeros(3 * size, dtype=torch.float32)
    diff.index_add_(0, torch.from_numpy(index), torch.from_numpy(weights.astype(np.float32)))
    painted = diff.view(3, num_frames, height + 1, row).cumsum(3).cumsum(2)[:, :, :height, :width]
    # Counts are integers; rounding removes the float error of the cumulative sums.
    coverage = painted[0].round().to(torch.int32)  # (F, H, W)
    field = torch.where(coverage > 0, painted[1:] / coverage.clamp(min=1), 0.0)  # (2, F, H, W)
    return field.permute(1, 0, 2, 3).contiguous().numpy(), coverage.numpy()


def _gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Central differences with replicated borders; img (N, 1, H, W).
    padded = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gx = (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / 2
    gy = (padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / 2
    return gx, gy


def _warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    # Samples img at x - flow, i.e. moves img forward by flow; img (N, 1, H, W), flow (N, 2, H, W).
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    gx = (xs - flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys - flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # (N, H, W, 2)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _lk_step(prev: torch.Tensor, cur: torch.Tensor, window: int, min_eig: float) -> torch.Tensor:
    # One least-squares solve of Ix*u + Iy*v + It = 0 over each window; prev, cur (N, 1, H, W).
    gx, gy = _gradients((prev + cur) / 2)
    gt = cur - prev

    def box(x):
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    sxx, syy, sxy = box(gx * gx), box(gy * gy), box(gx * gy)
    sxt, syt = box(gx * gt), box(gy * gt)
    det = sxx * syy - sxy * sxy
    half_trace = (sxx + syy) / 2
    smallest = half_trace - torch.sqrt(torch.clamp(half_trace * half_trace - det, min=0))
    # Where the window has no texture in some direction (aperture problem), the solve is noise: give 0.
    ok = smallest > min_eig
    safe = torch.where(ok, det, torch.ones_like(det))
    u = torch.where(ok, (sxy * syt - syy * sxt) / safe, torch.zeros_like(det))
    v = torch.where(ok, (sxy * sxt - sxx * syt) / safe, torch.zeros_like(det))
    return torch.cat([u, v], dim=1)


def rgb_difference_flow(
    prev: np.ndarray | torch.Tensor,
    cur: np.ndarray | torch.Tensor,
    window: int = 9,
    levels: int = 3,
    min_eig: float = 1.0,
) -> np.ndarray:
    """Dense flow from the temporal difference of two grey frames (pyramidal Lucas-Kanade).

    The fallback where a frame has no motion vectors (key frames, intra-only frames, VP9): the frame
    difference is solved against the spatial gradients for the displacement, coarse to fine so that a few
    pixels per frame are still caught.

    Args:
        prev, cur (uint8 or float[N, H, W]): grey frames in [0, 255], `prev` one source frame before `cur`.

    Returns:
        float32[N, 2, H, W] forward flow (dx, dy) in pixels per frame, 0 where the image has no texture.
    """
    prev_t = torch.as_tensor(prev).float().unsqueeze(1)  # (N, 1, H, W)
    cur_t = torch.as_tensor(cur).float().unsqueeze(1)
    if prev_t.shape != cur_t.shape or prev_t.dim() != 4:
        raise ValueError(
            f"rgb_difference_flow: prev and cur must both be (N, H, W), got {tuple(prev_t.shape)} "
            f"and {tuple(cur_t.shape)}"
        )
    pyramid = [(prev_t, cur_t)]
    for _ in range(levels - 1):
        p, c = pyramid[-1]
        if min(p.shape[-2:]) < 2 * window:
            break
        pyramid.append((F.avg_pool2d(p, 2), F.avg_pool2d(c, 2)))
    flow = None
    for p, c in reversed(pyramid):
        if flow is None:
            flow = torch.zeros(p.shape[0], 2, *p.shape[-2:])
        else:
            flow = 2 * F.interpolate(flow, size=p.shape[-2:], mode="bilinear", align_corners=False)
        flow = flow + _lk_step(_warp(p, flow), c, window, min_eig)
    return flow.numpy().astype(np.float32, copy=False)


def quantize(field: np.ndarray) -> np.ndarray:
    """Float flow to the cached int8 form (quarter pixels, saturating)."""
    return np.clip(np.rint(field * MOTION_QUANT), -127, 127).astype(np.int8)


def dequantize(field: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cached int8 flow back to float32 pixels."""
    return torch.as_tensor(field).float() / MOTION_QUANT
