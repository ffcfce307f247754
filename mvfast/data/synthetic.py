"""The embedded synthetic micro-video set: real encoded files, generated deterministically from a seed.

Each class is a combination of four factors, one per modality:

- motion: the direction of the moving objects and their pattern (straight, or zig-zagging across it);
- scene: the background texture (stripes, checks, rings, gradient) and its colour;
- sound: the pitch and the rhythm of a beeping tone;
- title: two words.

Each factor takes about C / 2 values, each value shared by two classes, and the assignment is drawn so that
any two classes differ in at least three of the four factors. So no single modality separates all classes
(each confuses pairs), while any two modalities together almost do. On top, every video varies: one to three
objects of random size, shape, colour, speed and start, texture phase and brightness, pixel noise, pitch and
loudness jitter, audio noise; 15 % of the videos have no audio track and 15 % no title, and a title word is
replaced by another class's word 20 % of the time. Fusion is needed to classify all of it.

Files are H.264 mp4 with an AAC track (mono, 22.05 kHz, so decoding exercises the resampler), 128x128 at
25 fps, 4 s by default (room for random clip offsets and several test clips; about 50 s to generate the
default 240 videos on 2 busy cores), listed in ``manifest.csv`` (path, label, title, split, class_name,
has_audio) with ``classes.txt``. Generation writes into a temporary sibling folder and renames it into
place, so processes that generate concurrently never see a half-written set; a generation that fails or is
stopped removes its folder, and one killed outright has its folder removed by the next. Command line::

    python -m mvfast.data.synthetic --out DIR [--classes 10] [--videos-per-class 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .cache import default_cache_dir
from .config import DataConfig
from .datasets import VideoCSV
from .encode import encode_video

try:
    import fcntl
except ImportError:  # not on Windows: abandoned folders are then left for the user to delete
    fcntl = None

# Bumped whenever the generated content changes, so an old set on disk is not taken for the new one.
GENERATOR_VERSION = 1

TEXTURES = ("hstripes", "vstripes", "checks", "rings", "gradient")
RHYTHMS = (2.0, 3.0, 4.5, 6.0, 8.0)  # beeps per second
WORD_GROUPS = (
    ("sunset", "beach"),
    ("city", "traffic"),
    ("forest", "hike"),
    ("snow", "winter"),
    ("party", "dance"),
    ("kitten", "cute"),
    ("cooking", "recipe"),
    ("football", "goal"),
    ("guitar", "song"),
    ("rain", "storm"),
    ("garden", "flowers"),
    ("gym", "workout"),
    ("ocean", "waves"),
    ("night", "lights"),
    ("car", "drive"),
    ("baby", "laugh"),
    ("desert", "sand"),
    ("river", "boat"),
    ("market", "food"),
    ("mountain", "view"),
)
FILLER = (
    "my",
    "new",
    "video",
    "today",
    "wow",
    "look",
    "best",
    "day",
    "so",
    "fun",
    "vlog",
    "this",
    "omg",
    "lol",
)


# ----------------------------------------------------------------------------------------------------
# The class design
# ----------------------------------------------------------------------------------------------------

FACTORS = ("motion", "scene", "sound", "title")
"""What each class combines, one factor per modality (the columns of :func:`class_factors`)."""


def class_factors(num_classes: int, seed: int = 0) -> np.ndarray:
    """Factor values of every class: int[num_classes, 4] (motion, scene, sound, title).

    Each factor has ceil(C / 2) values (at least 2), each used by at most two classes, and any two classes
    share at most one factor value (for C >= 4), so dropping (or confusing) one modality never makes two
    classes equal.
    """
    if num_classes < 2:
        raise ValueError(f"class_factors: num_classes must be >= 2, got {num_classes}")
    values = max(2, math.ceil(num_classes / 2))
    if values > len(WORD_GROUPS):
        raise ValueError(f"class_factors: at most {2 * len(WORD_GROUPS)} classes, got {num_classes}")
    rng = np.random.default_rng([seed, 7919])
    best, best_shared = None, len(FACTORS) + 1
    for _ in range(2000):
        table = np.stack([rng.permutation(np.arange(num_classes) % values) for _ in FACTORS], axis=1)
        shared = (table[:, None, :] == table[None, :, :]).sum(-1)
        np.fill_diagonal(shared, 0)
        if shared.max() < best_shared:
            best, best_shared = table, shared.max()
        # With 3 classes and 2 values some pair must share two factors; keep the best draw there.
        if best_shared <= 1:
            break
    return best


def class_names(factors: np.ndarray) -> list[str]:
    return [f"{c:02d}-m{m}s{s}a{a}t{t}" for c, (m, s, a, t) in enumerate(factors.tolist())]


def _texture(kind: str, hue: float, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(10, 18)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "hstripes":
        t = np.sin(2 * np.pi * yy / period + phase)
    elif kind == "vstripes":
        t = np.sin(2 * np.pi * xx / period + phase)
    elif kind == "checks":
        t = np.sign(np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period + phase))
    elif kind == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period + phase)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w)) * 2 - 0.5
    base = np.array([0.5 + 0.4 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)], dtype=np.float32)
    brightness = rng.uniform(0.75, 1.15)
    img = (base[None, None, :] * (0.75 + 0.25 * t[..., None])) * brightness
    return np.clip(img * 255, 0, 255).astype(np.float32)


def render_video(
    factors,
    values: int,
    rng: np.random.Generator,
    size: int = 128,
    fps: float = 25.0,
    seconds: float = 4.0,
    audio_rate: int = 22050,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (uint8[N, size, size, 3]) and audio (float32[S]) of one video of a class with these factors
    (each in [0, values))."""
    motion_v, scene_v, sound_v, _ = (int(v) for v in factors)
    n = round(fps * seconds)
    background = _texture(TEXTURES[scene_v % len(TEXTURES)], (scene_v * 0.618) % 1.0, size, size, rng)

    angle = 2 * np.pi * motion_v / values + rng.normal(0, 0.08)
    direction = np.array([np.cos(angle), np.sin(angle)])  # (dx, dy), image y pointing down
    zigzag = motion_v % 2 == 1
    count = int(rng.integers(1, 4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    objects = []
    for _ in range(count):
        objects.append(
            {
                "start": rng.uniform(0, size, 2),
                "speed": rng.uniform(1.5, 3.0),
                "radius": rng.uniform(6, 13),
                "square": bool(rng.integers(0, 2)),
                "colour": rng.uniform(0, 255, 3).astype(np.float32),
            }
        )
    noise = rng.uniform(2, 6)
    normal = np.array([-direction[1], direction[0]])
    for i in range(n):
        img = background.copy()
        for ob in objects:
            pos = ob["start"] + direction * ob["speed"] * i
            if zigzag:
                pos = pos + normal * 6 * np.sin(2 * np.pi * i / 12)
            # Toroidal distances keep the objects on screen as they wrap around.
            dx = (xx - pos[0] + size / 2) % size - size / 2
            dy = (yy - pos[1] + size / 2) % size - size / 2
            if ob["square"]:
                inside = (np.abs(dx) < ob["radius"]) & (np.abs(dy) < ob["radius"])
            else:
                inside = dx * dx + dy * dy < ob["radius"] ** 2
            img[inside] = ob["colour"]
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)

    t = np.arange(round(seconds * audio_rate)) / audio_rate
    pitch = 300.0 * 1.4 ** (sound_v % 10) * rng.uniform(0.96, 1.04)
    rhythm = RHYTHMS[sound_v % len(RHYTHMS)]
    gate = (np.sin(2 * np.pi * rhythm * t + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    loudness = rng.uniform(0.2, 0.5)
    audio = loudness * gate * np.sin(2 * np.pi * pitch * t) + rng.uniform(0.005, 0.03) * rng.normal(
        size=t.size
    )
    return frames, audio.astype(np.float32)


def make_title(title_v: int, rng: np.random.Generator) -> str:
    words = []
    for w in WORD_GROUPS[title_v]:
        if rng.random() < 0.2:
            w = WORD_GROUPS[int(rng.integers(len(WORD_GROUPS)))][int(rng.integers(2))]
        if rng.random() < 0.8:
            words.append(w)
    words += [str(x) for x in rng.choice(FILLER, size=int(rng.integers(1, 4)), replace=False)]
    rng.shuffle(words)
    return " ".join(words).capitalize()


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def _params(num_classes, videos_per_class, seed, size, seconds, fps) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "videos_per_class": videos_per_class,
        "seed": seed,
        "size": size,
        "seconds": seconds,
        "fps": fps,
    }


def generate(
    out: str | os.PathLike,
    num_classes: int = 10,
    videos_per_class: int = 24,
    seed: int = 0,
    size: int = 128,
    seconds: float = 4.0,
    fps: float = 25.0,
    train_fraction: float = 2 / 3,
    progress: bool = False,
) -> Path:
    """Writes the set into folder `out` (atomically: a temporary sibling folder renamed into place).

    If `out` already holds a complete set with the same parameters it is kept as is; if it holds anything
    else, that is an error. Returns `out`.
    """
    if videos_per_class < 2:
        raise ValueError(
            f"generate: videos_per_class must be >= 2 (one train, one test), got {videos_per_class}"
        )
    if size % 2 or size < 16:
        raise ValueError(f"generate: size must be even and >= 16, got {size}")
    out = Path(out)
    params = _params(num_classes, videos_per_class, seed, size, seconds, fps)
    if _complete(out, params):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"generate: {str(out)!r} exists and is not a synthetic set with these parameters ({params})"
        )
    factors = class_factors(num_classes, seed)
    values = int(factors.max()) + 1
    names = class_names(factors)
    n_train = max(1, min(videos_per_class - 1, round(videos_per_class * train_fraction)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _scratch_folder(out) as (tmp, check_signal):
        rows = []
        started = time.perf_counter()
        total = num_classes * videos_per_class
        for index, (label, k) in enumerate(itertools.product(range(num_classes), range(videos_per_class))):
            rng = np.random.default_rng([seed, label, k])
            frames, audio = render_video(factors[label], values, rng, size=size, fps=fps, seconds=seconds)
            has_audio = rng.random() >= 0.15
            title = make_title(int(factors[label][3]), rng) if rng.random() >= 0.15 else ""
            rel = f"videos/{names[label]}/{k:03d}.mp4"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            encode_video(tmp / rel, frames, fps=fps, audio=audio if has_audio else None)
            check_signal()
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "title": title,
                    "split": "train" if k < n_train else "test",
                    "class_name": names[label],
                    "has_audio": int(has_audio),
                }
            )
            if progress and (index + 1) % 20 == 0:
                print(
                    f"  {index + 1}/{total} videos ({time.perf_counter() - started:.0f} s)", file=sys.stderr
                )
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        info = dict(params, factors=factors.tolist(), modalities=list(FACTORS))
        # Written last: its presence marks a complete set.
        (tmp / "info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        try:
            if out.exists():
                out.rmdir()  # an empty folder (checked above) may be replaced
            os.rename(tmp, out)
        except OSError:
            # Another process renamed its copy into place first; the sets are identical, keep that one.
            if not _complete(out, params):
                raise
    return out


def _complete(out: Path, params: dict) -> bool:
    info = out / "info.json"
    if not info.is_file():
        return False
    try:
        stored = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(stored.get(k) == v for k, v in params.items())


@contextlib.contextmanager
def _scratch_folder(out: Path):
    """A new temporary sibling folder of `out`, removed after the block unless the block renamed it away;
    yields (folder, check), check as `_sigterm_as_exit` gives it.

    It is removed on any exception, and on SIGTERM too (turned into SystemExit inside the block). A process
    killed outright (SIGKILL, power loss) cannot clean up, so each folder has a lock file, created first and
    held (flock) while its process writes: the next generation of the same set removes the folders whose
    lock nobody holds any more, and leaves those of processes still writing.
    """
    _remove_abandoned(out)
    lock_fd, lock_path = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".lock", dir=out.parent)
    tmp = Path(lock_path[: -len(".lock")])
    try:
        if fcntl is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        tmp.mkdir()
        with _sigterm_as_exit() as check:
            yield tmp, check
    finally:
        # The folder goes before its lock file: a folder without one is never a live process's.
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(lock_fd)


def _remove_abandoned(out: Path) -> None:
    """Removes the temporary folders of `out` left by processes that died while generating it."""
    if fcntl is None:
        return
    prefix = f".{out.name}.tmp-"
    for entry in list(out.parent.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        if entry.is_dir() and not entry.with_name(entry.name + ".lock").exists():
            shutil.rmtree(entry, ignore_errors=True)  # left by a version of mvfast that made no lock file
        elif entry.name.endswith(".lock"):
            try:
                fd = os.open(entry, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process is still writing
            else:
                shutil.rmtree(entry.with_name(entry.name[: -len(".lock")]), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
            finally:
                os.close(fd)


@contextlib.contextmanager
def _sigterm_as_exit():
    """Inside the block SIGTERM raises SystemExit(143), so that cleanup code runs, where by default it ends
    the process at once. Only in the main thread, and only while nobody else handles SIGTERM.

    Yields a function that raises that SystemExit again if a SIGTERM came: the handler's exception is lost
    where the signal lands in Python code run from C that swallows exceptions (a callback of PyAV's, a
    finalizer: "Exception ignored in ..."), so the caller calls it at its own boundaries as well."""
    received = []

    def check():
        if received:
            raise SystemExit(128 + received[0])

    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield check
        return

    def stop(signum, _frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield check
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_root() -> Path:
    """Where the synthetic sets live by default: ``default_cache_dir() / "synthetic"``."""
    return default_cache_dir() / "synthetic"


class SyntheticMicroVideos(VideoCSV):
    """The embedded synthetic set, generated on first use (about a minute for the default on 2 cores).

    Args:
        root: folder holding the generated sets (default: ``$MVFAST_CACHE/synthetic`` or
            ``~/.cache/mvfast/synthetic``); each parameter combination gets its own sub-folder.
        train: the training split (2/3 of each class) or the test split.
        num_classes, videos_per_class, seed, size, seconds: what to generate.
        config, cache: see :class:`mvfast.data.VideoDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        num_classes: int = 10,
        videos_per_class: int = 24,
        seed: int = 0,
        config: DataConfig | None = None,
        cache=True,
        size: int = 128,
        seconds: float = 4.0,
    ):
        root = Path(root) if root is not None else default_root()
        folder = (
            root / f"v{GENERATOR_VERSION}-c{num_classes}-n{videos_per_class}-s{seed}-{size}px-{seconds:g}s"
        )
        generate(
            folder,
            num_classes=num_classes,
            videos_per_class=videos_per_class,
            seed=seed,
            size=size,
            seconds=seconds,
        )
        self.folder = folder
        names = (folder / "classes.txt").read_text(encoding="utf-8").split()
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        self.factors = np.array(info["factors"])
        super().__init__(
            folder / "manifest.csv",
            config=config,
            train=train,
            cache=cache,
            split="train" if train else "test",
            classes=[str(i) for i in range(len(names))],
        )
        self.classes = names


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mvfast.data.synthetic",
        description="Write the synthetic micro-video set into a folder.",
    )
    parser.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (2..40)")
    parser.add_argument("--videos-per-class", type=int, default=24, help="videos per class (2/3 train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (even)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each video in seconds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = generate(
        args.out,
        num_classes=args.classes,
        videos_per_class=args.videos_per_class,
        seed=args.seed,
        size=args.size,
        seconds=args.seconds,
        progress=True,
    )
    print(
        f"wrote {args.classes * args.videos_per_class} videos of {args.classes} classes to {out} in "
        f"{time.perf_counter() - started:.1f} s (manifest: {out / 'manifest.csv'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
