"""Motion fields: rasterisation of block vectors, motion_scale and reference distances, RGB-difference flow,
and the direction of the field decoded from encoded videos."""

import numpy as np
import pytest
import torch

from mvfast.data import DataConfig, DecodedVideo, decode_video, sample_clip
from mvfast.data.encode import encode_video
from mvfast.data.motion import codec_vectors, rasterize, reference_distances, rgb_difference_flow

MV_DTYPE = np.dtype(
    [
        ("source", "<i4"),
        ("w", "u1"),
        ("h", "u1"),
        ("src_x", "<i2"),
        ("src_y", "<i2"),
        ("dst_x", "<i2"),
        ("dst_y", "<i2"),
        ("flags", "<u8"),
        ("motion_x", "<i4"),
        ("motion_y", "<i4"),
        ("motion_scale", "<u2"),
    ]
)


def mv(source, w, h, dst_x, dst_y, motion_x, motion_y, scale):
    return (source, w, h, 0, 0, dst_x, dst_y, 0, motion_x, motion_y, scale)


def test_rasterize_paints_boxes_exactly():
    boxes = np.array([[2, 1, 6, 4], [0, 0, 2, 2]], dtype=float)
    flow = np.array([[1.5, -2.0], [3.0, 4.0]])
    field, cover = rasterize(boxes, flow, np.array([0, 1]), 2, 5, 8)
    assert field.shape == (2, 2, 5, 8) and cover.shape == (2, 5, 8)
    expected0 = np.zeros((2, 5, 8), np.float32)
    expected0[0, 1:4, 2:6], expected0[1, 1:4, 2:6] = 1.5, -2.0
    np.testing.assert_array_equal(field[0], expected0)
    assert field[1, 0, :2, :2].tolist() == [[3.0, 3.0], [3.0, 3.0]] and field[1, 0, 2:].sum() == 0
    assert cover[0].sum() == 12 and cover[1].sum() == 4


def test_rasterize_averages_overlaps_snaps_and_clips():
    boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4], [6.5, 2.2, 6.7, 2.4], [-3, -3, 1, 1]], dtype=float)
    flow = np.array([[2.0, 0.0], [4.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    field, cover = rasterize(boxes, flow, np.zeros(4, int), 1, 4, 8)
    assert field[0, 0, 0, 0] == 0.5 and field[0, 0, 0, 1] == 2.0  # the clipped corner box averages in
    assert field[0, 0, 1, 2] == 3.0  # overlap of 2 and 4
    assert field[0, 0, 1, 5] == 4.0
    assert field[0, 0, 2, 6] == 1.0 and cover[0, 2, 6] == 1  # a sub-pixel box still lands on its pixel
    assert cover[0, 0, 0] == 2 and cover[0, 3, 7] == 0 and field[0, :, 3, 7].tolist() == [0.0, 0.0]


def test_rasterize_empty_and_bad_input():
    field, cover = rasterize(np.zeros((0, 4)), np.zeros((0, 2)), np.zeros(0, int), 3, 4, 4)
    assert field.shape == (3, 2, 4, 4) and not field.any() and not cover.any()
    with pytest.raises(ValueError, match="same length"):
        rasterize(np.zeros((2, 4)), np.zeros((1, 2)), np.zeros(2, int), 1, 4, 4)
    with pytest.raises(ValueError, match=r"frame indices must be in \[0, 1\)"):
        rasterize(np.zeros((1, 4)), np.zeros((1, 2)), np.array([1]), 1, 4, 4)


def test_codec_vectors_honour_motion_scale_source_and_distance():
    mvs = np.array(
        [
            mv(-1, 16, 16, 8, 8, -8, 4, 4),  # past ref, quarter-pel: flow (+2, -1)
            mv(-1, 8, 8, 20, 4, -4, 0, 2),  # past ref, half-pel: flow (+2, 0)
            mv(1, 16, 8, 8, 20, 6, -2, 2),
        ],  # future ref: flow (+3, -1)
        dtype=MV_DTYPE,
    )
    boxes, flow = codec_vectors(mvs)
    np.testing.assert_array_equal(flow, [[2, -1], [2, 0], [3, -1]])
    np.testing.assert_array_equal(boxes[0], [0, 0, 16, 16])
    np.testing.assert_array_equal(boxes[2], [0, 16, 16, 24])
    _, flow = codec_vectors(mvs, past_distance=2, future_distance=3)
    np.testing.assert_allclose(flow, [[1, -0.5], [1, 0], [1, -1 / 3]])
    with pytest.raises(ValueError, match="missing fields"):
        codec_vectors(np.zeros(3))


def test_reference_distances_from_picture_types():
    past, future = reference_distances(np.array([1, 3, 3, 2, 3, 2, 2]))
    assert past.tolist() == [1, 1, 2, 3, 1, 2, 1]
    assert future.tolist() == [3, 2, 1, 2, 1, 1, 1]


def test_rgb_difference_flow_recovers_a_shift():
    rng = np.random.default_rng(0)
    base = torch.nn.functional.avg_pool2d(
        torch.from_numpy(rng.uniform(0, 255, (1, 1, 96, 96))).float(), 5, stride=1, padding=2
    )[0, 0].numpy()
    ys, xs = np.mgrid[0:96, 0:96].astype(np.float32)
    # cur(x) = prev(x - d): content moves by d = (1.5, -1.0).
    cur = torch.nn.functional.grid_sample(
        torch.from_numpy(base)[None, None],
        torch.from_numpy(np.stack([(xs - 1.5) / 47.5 - 1, (ys + 1.0) / 47.5 - 1], -1))[None],
        align_corners=True,
        padding_mode="border",
    )[0, 0].numpy()
    flow = rgb_difference_flow(base[None], cur[None])
    inner = flow[0, :, 12:-12, 12:-12]
    assert np.median(inner[0]) == pytest.approx(1.5, abs=0.2)
    assert np.median(inner[1]) == pytest.approx(-1.0, abs=0.2)
    still = rgb_difference_flow(base[None], base[None])
    assert np.abs(still).max() < 1e-3


def moving_texture(dx, dy, n=16, size=64, seed=0):
    rng = np.random.default_rng(seed)
    bg = rng.integers(70, 110, (size, size, 3)).astype(np.uint8)
    patch = np.kron(np.indices((5, 5)).sum(0) % 2, np.ones((4, 4)))[..., None] * [180, 30, 30] + 50
    frames = np.repeat(bg[None], n, axis=0)
    for i in range(n):
        x, y = int(22 - 7.5 * dx) + dx * i, int(22 - 7.5 * dy) + dy * i
        frames[i, y : y + 20, x : x + 20] = patch
    return frames


@pytest.mark.parametrize(
    "suffix,codec,source",
    [("mp4", "libx264", "codec"), ("avi", "mpeg4", "codec"), ("webm", "libvpx-vp9", "rgb")],
)
@pytest.mark.parametrize("dx,dy", [(2, 0), (0, 2), (-2, 0)])
def test_decoded_motion_points_the_way_objects_move(tmp_path, suffix, codec, source, dx, dy):
    path = encode_video(tmp_path / f"m.{suffix}", moving_texture(dx, dy), fps=25, codec=codec)
    cfg = DataConfig(resize=64, size=64, clip_len=8)
    video = decode_video(path, cfg)
    if source == "codec":
        assert video.meta["motion_codec_frames"] >= 6
    else:
        assert video.meta["motion_codec_frames"] == 0 and video.meta["motion_rgb_frames"] >= 6
    flow = video.motion[:, 1:].astype(np.float32) / 4  # frame 0 has no previous frame
    moving = np.hypot(flow[0], flow[1]) > 0.75
    assert moving.sum() > 100
    mx, my = np.median(flow[0][moving]), np.median(flow[1][moving])
    # Pixels per source frame at the same resolution: about the true 2 px.
    assert mx == pytest.approx(dx, abs=0.75) and my == pytest.approx(dy, abs=0.75)


def test_motion_is_scaled_to_the_clip_resolution(tmp_path):
    path = encode_video(tmp_path / "m.mp4", moving_texture(2, 0), fps=25)
    video = decode_video(path, DataConfig(resize=32, size=32))  # 64 -> 32: half the pixels
    flow = video.motion[:, 1:].astype(np.float32) / 4
    moving = np.hypot(flow[0], flow[1]) > 0.4
    assert np.median(flow[0][moving]) == pytest.approx(1.0, abs=0.4)


def test_flip_negates_horizontal_motion():
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    frames[:, :, :8] = 200
    motion = np.zeros((2, 4, 16, 16), np.int8)
    motion[0, :, :, :8] = 8  # +2 px in the left half
    video = DecodedVideo(frames=frames, motion=motion, audio=None, meta={})
    cfg = DataConfig(clip_len=4, size=16, resize=16, scene_size=16)
    flipped = [
        sample_clip(video, cfg, train=True, generator=torch.Generator().manual_seed(s)) for s in range(8)
    ]
    assert {s["meta"]["flipped"] for s in flipped} == {True, False}
    for s in flipped:
        m = s["motion"][0, 0]
        if s["meta"]["flipped"]:
            assert (m[:, 8:] == -2).all() and (m[:, :8] == 0).all()
        else:
            assert (m[:, :8] == 2).all() and (m[:, 8:] == 0).all()
