"""Train a multimodal micro-video classifier.

    python -m mvfast.train                                     # tiny preset, synthetic set (made once)
    python -m mvfast.train --preset frame2d                    # the 2D frame baseline of Table 1
    python -m mvfast.train --modalities rgb,motion             # an ablation: the behaviour branch only
    python -m mvfast.train --dropout 0.25 --out runs/d025      # a column of Table 2 (python -m mvfast.sweep)
    python -m mvfast.train --data ucf101 --data-root ~/UCF-101 --split 1 --preset paper --amp
    python -m mvfast.train --data folder --data-root videos/   # one sub-folder per class, 20 % held out
    python -m mvfast.train --data csv --data-root list.csv     # path,label[,title][,split]
    python -m mvfast.train --config run.yaml --lr 1e-3         # a YAML file of these settings; flags win
    python -m mvfast.train --out runs/x --resume               # continue runs/x/last.pt exactly
    torchrun --nproc_per_node 2 -m mvfast.train                # DDP: gloo on CPU, nccl on GPUs

The settings and their defaults are the TrainConfig block below; every one is a flag (``--batch-size``).
Model config fields without a flag of their own: ``--set name=value`` (repeatable).

Writes into --out: config.yaml (the resolved settings), last.pt (every --ckpt-every steps and at each epoch
end), best.pt (best validation top-1), metrics.csv (one row per epoch), precision.png and loss.png (the
paper's Fig. 3 and 4), summary.md / summary.json (the rows of Table 1), tensorboard/ with --tensorboard.
Ctrl-C (or SIGTERM) saves last.pt at the next step boundary and exits; --resume continues bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mvfast._cli import (
    CLIError,
    atomic_save,
    atomic_write_text,
    create_model,
    data_config_to_dict,
    data_source,
    latest_checkpoint,
    load_checkpoint,
    parse_modalities,
    pick_device,
    run_main,
    set_backend,
    to_device,
)
from mvfast.metrics import Accumulator


@dataclass
class TrainConfig:
    # data
    data: str = "synthetic"  # synthetic | ucf101 | folder | csv
    data_root: str | None = None  # UCF101 root, class-folder root or CSV file; synthetic: where sets are made
    split: int = 1  # UCF101 split: 1, 2 or 3
    val_root: str | None = None  # folder data: a validation folder of the same classes (else --val-fraction)
    train_split: str = "train"  # csv data with a split column: the training rows ...
    val_split: str = "test"  # ... and the validation rows
    val_fraction: float = 0.2  # folder/csv data without a split: videos of each class held out
    synthetic_classes: int = 10  # synthetic set: classes
    synthetic_videos: int = 24  # synthetic set: videos per class (2/3 train, 1/3 validation)
    synthetic_size: int = 128  # synthetic set: frame side in pixels
    synthetic_seconds: float = 4.0  # synthetic set: seconds per video
    synthetic_seed: int = 0  # synthetic set: the seed it is generated from
    fps: float = 12.5  # decoded frames per second
    resize: int = 128  # decoded frames: resized and centre-cropped to this square (then cached)
    test_clips: int = 3  # clips per validation video, averaged for the video-level metrics
    cache: bool = True  # cache decoded videos on disk ($MVFAST_CACHE, default ~/.cache/mvfast)
    workers: int = 2  # DataLoader worker processes
    # model
    preset: str = "tiny"  # tiny | paper | frame2d
    modalities: str | None = (
        None  # comma-separated subset of rgb,motion,frames,audio,text; None: the preset's
    )
    dropout: float | None = None  # dropout before the classifier (Table 2); None: the preset's
    overrides: dict = field(default_factory=dict)  # other model config fields (--set name=value)
    # optimisation
    epochs: int = 10  # passes over the training set
    steps: int | None = None  # total steps; when set it replaces --epochs
    batch_size: int = 8  # clips per step and process
    lr: float = 2e-3  # peak learning rate (AdamW)
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warm-up
    warmup_steps: int = 20  # steps of linear warm-up from 0
    min_lr: float = 1e-5  # where cosine and linear end
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norm weights)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 0  # model init, augmentation, data order, dropout
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # mvfast kernels: auto | cpu | cuda | triton | reference
    amp: bool = False  # mixed precision: bfloat16 where supported, else float16 with loss scaling
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch intra-op threads; 0: PyTorch's choice
    # output
    out: str = "runs/train"  # output folder
    resume: str | None = None  # --resume: last.pt in --out; --resume FILE: that checkpoint
    ckpt_every: int = 100  # steps between checkpoints (also at every epoch end); 0: epoch ends only
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    tensorboard: bool = False  # TensorBoard logs in OUT/tensorboard (skipped if tensorboard is missing)
    progress: bool = True  # a progress bar with the loss and clips/s (on a terminal)
    stop_after: int = 0  # stop (saving last.pt) after this many steps of this invocation, like a
    # preempted job; --resume continues. 0: run to the end
    inference_videos: int = 8  # validation videos timed for the per-video inference time


DATA_FIELDS = (
    "data",
    "data_root",
    "split",
    "val_root",
    "train_split",
    "val_split",
    "val_fraction",
    "synthetic_classes",
    "synthetic_videos",
    "synthetic_size",
    "synthetic_seconds",
    "synthetic_seed",
    "test_clips",
    "cache",
    "workers",
)
# Settings of one invocation, not of the run: not taken from a checkpoint that is resumed.
INVOCATION_FIELDS = ("resume", "stop_after", "progress", "workers", "threads", "out")


# ---------------------------------------------------------------------------------------------------------
# Settings: defaults < checkpoint (when resuming) < YAML file < flags


def _comments() -> dict[str, str]:
    """The comment of every TrainConfig field, which is its --help."""
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).replace("%", "%%")
    return out


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_parser(prog: str, fields=None, description: str = "") -> argparse.ArgumentParser:
    """Flags for TrainConfig fields (all of them, or `fields`); values absent from argv stay unset."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helps = _comments()
    for f in dataclasses.fields(TrainConfig):
        if fields is not None and f.name not in fields:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{helps.get(f.name, '')} (default: {default})"
        if f.name == "overrides":
            parser.add_argument("--set", dest="overrides", action="append", metavar="NAME=VALUE", help=help_)
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", metavar="CHECKPOINT", help=help_)
        elif f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), help=help_)
    return parser


def _overrides(items) -> dict:
    out = {}
    for item in items or []:
        if isinstance(item, dict):
            out.update(item)
            continue
        if "=" not in item:
            raise CLIError(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = _parse_value(value)
    return out


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"config file {path!r} does not exist")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise CLIError(f"config file {path!r} must be a mapping of settings")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CLIError(f"config file {path!r}: unknown settings {unknown}")
    return values


def resolve_config(argv) -> tuple[TrainConfig, dict | None]:
    """The run's settings and, with --resume, the checkpoint."""
    parser = build_parser("python -m mvfast.train", description=__doc__)
    parser.add_argument("--config", metavar="YAML", help="a YAML file of these settings (flags override it)")
    args = vars(parser.parse_args(argv))
    file_values = read_yaml(args.pop("config")) if "config" in args else {}
    values = {**file_values, **args}
    if "overrides" in values:
        values["overrides"] = _overrides(values["overrides"])
    ckpt = None
    resume = values.get("resume")
    if resume:
        out = Path(values.get("out", TrainConfig.out))
        path = latest_checkpoint(out) if resume == "auto" else Path(resume)
        if path is None:
            raise CLIError(f"--resume: no checkpoint (last.pt) in {str(out)!r}")
        ckpt = load_checkpoint(path)
        stored = {k: v for k, v in ckpt["config"].items() if k not in INVOCATION_FIELDS}
        values = {**stored, **values}
        if "out" not in values and resume != "auto":
            values["out"] = str(Path(ckpt["path"]).parent)
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg, ckpt


def check_config(cfg: TrainConfig) -> None:
    positive = ("epochs", "batch_size", "test_clips", "synthetic_classes", "synthetic_videos", "resize")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {cfg.steps}")
    if not cfg.lr > 0:
        raise CLIError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise CLIError(f"unknown --schedule {cfg.schedule!r}; choose cosine, linear or constant")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise CLIError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {cfg.workers}")
    parse_modalities(cfg.modalities)


def base_data_config(cfg: TrainConfig):
    """The DataConfig of the data settings; the model then sets its input sizes on it."""
    from mvfast.data import DataConfig

    try:
        side = min(112, cfg.resize)
        return DataConfig(
            fps=cfg.fps, resize=cfg.resize, test_clips=cfg.test_clips, size=side, scene_size=side
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def model_overrides(cfg: TrainConfig) -> dict:
    overrides = dict(cfg.overrides)
    modalities = parse_modalities(cfg.modalities)
    if modalities is not None:
        overrides["modalities"] = modalities
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    return overrides


# ---------------------------------------------------------------------------------------------------------
# Data order and augmentation that a checkpoint can capture


class SeededClips(Dataset):
    """A training dataset whose random clip, crop and flip of item i in epoch e depend on (seed, e, i) only:
    not on the DataLoader worker that loads it, nor on where a run was stopped and resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a seeded permutation per epoch, this rank's share) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class Shard(Sampler):
    """Every world-th index from rank on, in order, without DistributedSampler's padding (so that metrics
    gathered from all ranks count every clip once)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _ignore_sigint(_worker_id):
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint at the next step boundary
    # and needs its workers alive until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------
# Learning rate, RNG, checkpoints


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------
# Logging


METRIC_KEYS = ("loss", "precision", "recall", "top1", "top5", "mean_class_accuracy")


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(path.with_suffix(".tmp"), path)


def plot_history(out: Path, history: list[dict]) -> None:
    """precision.png and loss.png per epoch, training and validation (the paper's Fig. 3 and 4)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, title, name in (("precision", "Precision", "precision.png"), ("loss", "Loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in history if f"{split}_{key}" in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), style, label={"train": "training", "val": "validation"}[split]
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.lower())
        ax.set_title(f"{title} in training and validation sets")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f".{name}.tmp.png")
        plt.close(fig)
        os.replace(out / f".{name}.tmp.png", out / name)


def summary_table(summary: dict) -> str:
    t, v = summary["train"], summary["val"]
    rows = [
        ("precision", "precision"),
        ("recall", "recall"),
        ("top-1", "top1"),
        ("top-5", "top5"),
        ("mean class accuracy", "mean_class_accuracy"),
        ("loss", "loss"),
    ]

    def fmt(d, k):
        return f"{d[k]:.3f}" if k in d else "-"

    lines = [f"| {summary['preset']} ({summary['data']}) | training | validation |", "|---|---:|---:|"]
    lines += [f"| {name} | {fmt(t, k)} | {fmt(v, k)} |" for name, k in rows]
    conv = summary.get("converged")
    if conv:
        lines.append(f"| time to converge | {conv['seconds']:.0f} s (epoch {conv['epoch']}) | |")
    inf = summary.get("inference")
    if inf:
        lines.append(
            f"| inference time per video | {inf['model_ms']:.1f} ms model | "
            f"{inf['total_ms']:.1f} ms with decoding |"
        )
    lines.append(f"| training time | {summary['train_seconds']:.0f} s, {summary['steps']} steps | |")
    return "\n".join(lines)


def convergence(history: list[dict]) -> dict | None:
    """Training time until validation top-1 first came within 0.01 of the run's best."""
    vals = [r for r in history if "val_top1" in r]
    if not vals:
        return None
    best = max(r["val_top1"] for r in vals)
    first = next(r for r in vals if r["val_top1"] >= best - 0.01)
    return {"seconds": first["time"], "epoch": first["epoch"], "val_top1": first["val_top1"]}


# ---------------------------------------------------------------------------------------------------------
# The run


def main(argv=None) -> int:
    return run_main("mvfast.train", train, argv)


def train(argv=None) -> dict:
    from mvfast.data import Collate, SkipCounter, VideoDataset
    from mvfast.evaluate import infer, validation_metrics
    from mvfast.predict import time_inference

    cfg, ckpt = resolve_config(argv)
    started = time.perf_counter()

    # distributed: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    ddp = world > 1
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_backend(cfg.backend, device)
    out = Path(cfg.out)

    # data sources (rank 0 first: it generates the synthetic set if needed)
    base = base_data_config(cfg)
    if master:
        if cfg.data == "synthetic":
            log(
                f"synthetic set: {cfg.synthetic_classes} classes x {cfg.synthetic_videos} videos "
                "(generated once, about a minute for the default)",
                flush=True,
            )
        source = data_source(cfg, base)
    if ddp:
        dist.barrier()
    if not master:
        source = data_source(cfg, base)
    classes = source.classes

    # model
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    overrides = model_overrides(cfg)
    raw_model = create_model(cfg.preset, len(classes), overrides)
    try:
        data_cfg = raw_model.config.data_config(base)
    except ValueError as e:
        raise CLIError(f"model {cfg.preset!r} and the data settings do not fit: {e}") from None
    raw_model.to(device)
    spec = {"preset": cfg.preset, "num_classes": len(classes), "overrides": overrides}
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    amp_dtype = None
    if cfg.amp:
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if device.type == "cpu" or gpu_bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    cache = True if cfg.cache else False
    train_set = VideoDataset(
        source.train_items, classes, data_cfg, True, cache, source.use_titles, source.name
    )
    val_set = (
        VideoDataset(source.val_items, classes, data_cfg, False, cache, source.use_titles, source.name)
        if source.val_items
        else None
    )
    train_data = SeededClips(train_set, cfg.seed)
    sampler = ResumableSampler(train_data, world, rank, cfg.seed)
    batch_size = cfg.batch_size
    if sampler.num_samples < batch_size:
        batch_size = sampler.num_samples
        log(f"batch size lowered to {batch_size}: the training set has {len(train_set)} videos")
    steps_per_epoch = sampler.num_samples // batch_size
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    collate = (
        Collate(audio_windows=data_cfg.max_audio_windows, title_tokens=data_cfg.max_title_tokens)
        if cfg.compile
        else Collate()
    )
    loader_opts = dict(
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_sigint,
        # The loader's own generator, so that building an iterator does not draw from the global RNG that
        # dropout uses: a resumed run then draws what the uninterrupted one drew.
        generator=torch.Generator(),
    )
    train_loader = DataLoader(train_data, batch_size, sampler=sampler, drop_last=True, **loader_opts)
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size, sampler=Shard(len(val_set), rank, world), **loader_opts)

    # state: fresh, or from the checkpoint
    step, epoch, position, history, train_seconds = 0, 0, 0, [], 0.0
    train_acc = Accumulator(len(classes))
    best_top1 = -1.0
    if ckpt is not None:
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CLIError(f"checkpoint {ckpt['path']!r} does not fit this model: {e}") from None
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        history, train_seconds, best_top1 = ckpt["history"], ckpt["train_seconds"], ckpt["best_top1"]
        train_acc.load_state(ckpt["train_acc"][rank] if rank < len(ckpt["train_acc"]) else train_acc.state())
        if ckpt.get("world", 1) != world:
            log(f"note: resuming a {ckpt.get('world', 1)}-process run with {world}: the data order changes")
        log(f"resumed from {ckpt['path']} at step {step} (epoch {epoch + 1}, batch {position})")
    if ckpt is not None and "rng" in ckpt:
        states = ckpt["rng"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
    else:
        # Dropout differs between ranks; the model's initial weights (drawn above) do not.
        torch.manual_seed(cfg.seed + rank)

    model = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    if master:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None and latest_checkpoint(out) is not None:
            log(f"note: {out} holds an earlier run; starting a new one over it (--resume continues a run)")
        import yaml

        resolved = dataclasses.asdict(cfg)
        resolved["data_config"] = data_config_to_dict(data_cfg)
        resolved["overrides"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in resolved["overrides"].items()
        }
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    writer = None
    if master and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log("note: --tensorboard skipped: tensorboard is not installed (pip install tensorboard)")

    def gather(obj):
        if not ddp:
            return [obj]
        objs = [None] * world
        dist.all_gather_object(objs, obj)
        return objs

    def save(path: Path, **extra):
        # every rank takes part (RNG states and training counts are gathered); rank 0 writes
        states = gather(rng_state())
        accs = gather(train_acc.state())
        if not master:
            return
        atomic_save(
            {
                "format": 1,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": epoch,
                "position": position,
                "history": history,
                "train_seconds": train_seconds,
                "best_top1": best_top1,
                "train_acc": accs,
                "rng": states,
                "world": world,
                "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
                "model_spec": {
                    **spec,
                    "overrides": {
                        k: list(v) if isinstance(v, tuple) else v for k, v in spec["overrides"].items()
                    },
                },
                "data_config": data_config_to_dict(data_cfg),
                "classes": classes,
                "source": source.name,
                **extra,
            },
            path,
        )

    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    n_params = sum(p.numel() for p in raw_model.parameters())
    times = f" x {world}" if ddp else ""
    log(
        f"{source.name}: {len(train_set)} training / {len(source.val_items)} validation videos, "
        f"{len(classes)} classes | {cfg.preset} ({n_params / 1e6:.2f} M parameters) on {device}{times}, "
        f"backend {cfg.backend} | {epochs} epochs of {steps_per_epoch} steps, batch {batch_size}{times}",
        flush=True,
    )
    skips = SkipCounter()
    steps_this_run = 0
    from tqdm import tqdm

    while step < total_steps:
        sampler.set_position(epoch, position * batch_size)
        train_data.epoch = epoch
        model.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=position,
            desc=f"epoch {epoch + 1}/{epochs}",
            # None: tqdm shows the bar on a terminal only, so logs and CI output get the epoch lines alone
            disable=None if (master and cfg.progress) else True,
            dynamic_ncols=True,
            leave=False,
        )
        t0 = rate_t0 = time.perf_counter()
        clips = 0
        batches = iter(train_loader)
        interrupted = False
        while position < steps_per_epoch and step < total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                if stop["signal"] is None:
                    raise
                interrupted = True  # a worker was stopped by the signal as well
                break
            skips.update(batch)
            labels = batch["label"]
            has_data = labels.numel() > 0
            if ddp:
                flag = torch.tensor([int(has_data)], device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                has_data = bool(flag.item())
            if has_data:
                lr = lr_at(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = to_device(batch, device)
                labels = batch["label"]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    output = model(batch)
                    loss = raw_model.loss(output, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                loss_value = loss.item()
                train_acc.update(output["logits"], labels, loss_value)
                clips += labels.numel()
                bar.set_postfix(
                    loss=f"{loss_value:.3f}",
                    lr=f"{lr:.2e}",
                    clips_s=f"{clips * world / (time.perf_counter() - rate_t0):.1f}",
                )
                if writer is not None:
                    writer.add_scalar("train/loss_step", loss_value, step)
                    writer.add_scalar("train/lr", lr, step)
            step += 1
            position += 1
            steps_this_run += 1
            bar.update(1)
            stopping = stop["signal"] is not None or (cfg.stop_after and steps_this_run >= cfg.stop_after)
            if ddp:
                flag = torch.tensor([int(bool(stopping))], device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if stopping:
                interrupted = True
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and position < steps_per_epoch:
                train_seconds += time.perf_counter() - t0  # saving is not training time
                save(out / "last.pt")
                t0 = time.perf_counter()
        bar.close()
        train_seconds += time.perf_counter() - t0
        if interrupted:
            del batches
            save(out / "last.pt")
            why = stop["signal"] or f"--stop-after {cfg.stop_after}"
            log(
                f"stopped by {why} at step {step}; saved {out / 'last.pt'} (continue with --resume)",
                flush=True,
            )
            for s, h in previous_handlers.items():
                signal.signal(s, h)
            if ddp:
                dist.destroy_process_group()
            if stop["signal"] is not None:
                sys.exit(130 if stop["signal"] == "SIGINT" else 143)
            return {"stopped": step}
        del batches

        # epoch end: counts from every rank, validation, the epoch's row, plots, checkpoints
        if ddp:
            state = train_acc.state()
            dist.all_reduce(state)
            train_acc.load_state(state)
        train_metrics = train_acc.compute()
        skipped = skips.end_epoch(epoch + 1)
        row = {"epoch": epoch + 1, "step": step, "time": train_seconds}
        row.update({f"train_{k}": train_metrics[k] for k in METRIC_KEYS})
        last_epoch = step >= total_steps
        if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            # Without the DDP wrapper: the ranks' shards may differ by a batch, and eval needs no sync.
            eval_model = model.module if ddp else model
            result = infer(
                eval_model, val_loader, raw_model.loss, device, amp_dtype, gather=gather if ddp else None
            )
            if result is not None:
                clip_m, video_m = validation_metrics(result, len(classes))
                row.update({f"val_{k}": video_m[k] for k in METRIC_KEYS})
                row.update({f"val_clip_{k}": clip_m[k] for k in METRIC_KEYS})
                skipped += result["num_skipped"]
        row["skipped"] = skipped
        history.append(row)
        epoch += 1
        position = 0
        train_acc = Accumulator(len(classes))
        if master:
            val_text = (
                f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.3f} "
                f"(clips {row['val_clip_top1']:.3f})"
                if "val_top1" in row
                else ""
            )
            log(
                f"epoch {epoch}/{epochs} step {step} | train loss {row['train_loss']:.3f} top-1 "
                f"{row['train_top1']:.3f}{val_text} | {train_seconds:.0f} s"
                + (f" | skipped {skipped} files" if skipped else ""),
                flush=True,
            )
            write_metrics_csv(out / "metrics.csv", history)
            plot_history(out, history)
            if writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "step"):
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch)
                writer.flush()
        improved = row.get("val_top1", -1.0) > best_top1
        if improved:
            best_top1 = row["val_top1"]
        save(out / "last.pt")
        if improved and master:
            shutil.copyfile(out / "last.pt", out / ".best.pt.tmp")
            os.replace(out / ".best.pt.tmp", out / "best.pt")
        if train_metrics["count"] == 0:
            raise CLIError(f"epoch {epoch}: no training video could be decoded (skipped {skipped} files)")

    for s, h in previous_handlers.items():
        signal.signal(s, h)

    # the summary: the last epoch's metrics, convergence time, per-video inference time
    summary = None
    if master:
        last = history[-1] if history else {}
        summary = {
            "preset": cfg.preset,
            "data": source.name,
            "modalities": list(getattr(raw_model.config, "modalities", ())),
            "dropout": getattr(raw_model.config, "dropout", None),
            "train": {k: last[f"train_{k}"] for k in METRIC_KEYS if f"train_{k}" in last},
            "val": {k: last[f"val_{k}"] for k in METRIC_KEYS if f"val_{k}" in last},
            "val_clip": {k: last[f"val_clip_{k}"] for k in METRIC_KEYS if f"val_clip_{k}" in last},
            "best_val_top1": best_top1,
            "converged": convergence(history),
            "train_seconds": train_seconds,
            "steps": step,
            "epochs": epoch,
            "device": str(device),
            "world": world,
        }
        if val_set is not None and cfg.inference_videos > 0:
            items = source.val_items[: cfg.inference_videos]
            summary["inference"] = time_inference(raw_model, items, data_cfg, device, source.use_titles)
        summary["wall_seconds"] = time.perf_counter() - started
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        table = summary_table(summary)
        atomic_write_text(out / "summary.md", table + "\n")
        log("\n" + table + "\n")
        log(f"outputs in {out}/ (last.pt, best.pt, metrics.csv, precision.png, loss.png, summary.md)")
    if writer is not None:
        writer.close()
    if ddp:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(main())
