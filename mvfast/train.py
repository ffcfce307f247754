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

Every setting below is a flag; model config fields without a flag of their own: --set name=value.

Each run gets its own folder: --out, or else runs/train (runs/train-2, ... when that holds a run). An --out
that holds a run is refused unless --resume continues it or --force starts over. The folder gets
config.yaml (the resolved settings), train.log (what the console showed), last.pt (the training state,
every --ckpt-every steps and at each epoch end), best.pt (the weights of the best validation top-1, with
what evaluate and predict need), metrics.csv (a row per epoch), precision.png and loss.png (the paper's
Fig. 3 and 4), summary.md / summary.json (the rows of Table 1), tensorboard/ with --tensorboard.
Ctrl-C (or SIGTERM) saves last.pt at the next step boundary and exits; --resume continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mvfast import _checkpoint as ckpt_io
from mvfast import _run
from mvfast._cli import CLIError, Processes, StopSignal, run_main, set_backend, to_device
from mvfast._config import (
    TrainConfig,
    data_config,
    model_config,
    model_overrides,
    open_source,
    resolve,
    to_yaml,
)
from mvfast._inference import infer, time_inference, validation_metrics
from mvfast.data.samplers import ResumableSampler, SeededClips, Shard, ignore_sigint
from mvfast.metrics import Accumulator


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------
# What the steps share


@dataclass
class Job(Processes):
    """One invocation: its processes and device, its settings, its run folder and log."""

    cfg: TrainConfig = None
    out: Path = None
    log: _run.RunLog = None
    writer: object = None  # TensorBoard's SummaryWriter, on rank 0 with --tensorboard
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Data:
    source: object  # mvfast.data.sources.DataSource
    config: object  # mvfast.data.DataConfig
    train_data: SeededClips
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader | None
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    skips: object  # mvfast.data.SkipCounter, over the whole run

    @property
    def classes(self) -> list:
        return self.source.classes


@dataclass
class Learner:
    model: torch.nn.Module  # the model itself: its weights, its loss, its config
    net: torch.nn.Module  # what the steps call: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    spec: dict  # mvfast._checkpoint.model_spec


@dataclass
class Progress:
    """The counters a checkpoint holds besides the model and the optimizer."""

    train_acc: Accumulator
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch done
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    best_top1: float = -1.0
    lr: float = 0.0
    steps_this_run: int = 0


# ---------------------------------------------------------------------------------------------------------
# The run


def main(argv=None) -> int:
    return run_main("mvfast.train", train, argv)


def train(argv=None) -> dict:
    cfg, ckpt = resolve(argv, "python -m mvfast.train", __doc__)
    # The model's config and the data config it asks for: checked before any video is read or generated.
    data_cfg = data_config(cfg, model_config(cfg).inputs())
    job = setup(cfg, ckpt, data_cfg)
    try:
        data = loaders(job, data_cfg)
        learner = model_and_optimizer(job, data)
        progress = restore(job, learner, data, ckpt)
        learner.net = parallel(job, learner.model)
        job.log(describe(job, data, learner))
        with StopSignal() as stop:
            while progress.step < data.total_steps:
                if not run_epoch(job, data, learner, progress, stop):
                    return stopped(job, data, learner, progress, stop)
                end_of_epoch(job, data, learner, progress)
        return summary(job, data, learner, progress)
    except CLIError as e:
        job.log.to_file(f"error: {e}")
        raise
    finally:
        if job.writer is not None:
            job.writer.close()
        job.log.close()
        job.close()


def setup(cfg: TrainConfig, ckpt: dict | None, data_cfg) -> Job:
    """Processes, device, kernels, and the run folder with its config.yaml and train.log."""
    _run.refuse_taken(cfg.out, resume=ckpt is not None, force=cfg.force)
    procs = Processes.start(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_backend(cfg.backend, procs.device)
    out, note = _run.claim(cfg.out, cfg.force) if procs.master else (None, None)
    out = procs.share(out)  # chosen by rank 0 alone, so that every rank writes to the same one
    cfg = dataclasses.replace(cfg, out=str(out))
    job = Job(procs.rank, procs.world, procs.device, cfg, out, _run.RunLog(enabled=procs.master))
    if job.master:
        job.log.open(out / "train.log", append=ckpt is not None)
        if note:
            job.log(note)
        ckpt_io.atomic_write_text(out / "config.yaml", to_yaml(cfg, data_cfg))
        job.writer = _run.tensorboard(out, job.log) if cfg.tensorboard else None
    return job


def loaders(job: Job, data_cfg) -> Data:
    """The videos (rank 0 first: it generates the synthetic set if needed), datasets, samplers, loaders."""
    from mvfast.data import Collate, SkipCounter, VideoDataset

    cfg, log = job.cfg, job.log
    if job.master:
        if cfg.data == "synthetic":
            log(
                f"synthetic set: {cfg.synthetic_classes} classes x {cfg.synthetic_videos} videos "
                "(generated once, about a minute for the default)"
            )
        source = open_source(cfg, data_cfg)
    job.barrier()
    if not job.master:
        source = open_source(cfg, data_cfg)

    def dataset(items, training: bool):
        ds = VideoDataset(
            items, source.classes, data_cfg, training, cfg.cache, source.use_titles, source.name
        )
        ds.log_skips = False  # the loop's SkipCounter reports them, once per file
        return ds

    train_set = dataset(source.train_items, True)
    train_data = SeededClips(train_set, cfg.seed)
    sampler = ResumableSampler(train_data, job.world, job.rank, cfg.seed)
    batch_size = cfg.batch_size
    if sampler.num_samples < batch_size:
        batch_size = sampler.num_samples
        log(f"batch size lowered to {batch_size}: the training set has {len(train_set)} videos")
    steps_per_epoch = sampler.num_samples // batch_size
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    if cfg.warmup_steps > total_steps:
        log(
            f"warning: --warmup-steps {cfg.warmup_steps} is longer than the run ({total_steps} steps): the "
            f"learning rate stops at {lr_at(total_steps - 1, total_steps, cfg):.3g} and never reaches "
            f"--lr {cfg.lr:g}"
        )
    # Fixed lengths for torch.compile, which would otherwise recompile for every new audio or title length.
    collate = Collate(data_cfg.max_audio_windows, data_cfg.max_title_tokens) if cfg.compile else Collate()
    loader_opts = dict(
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=job.device.type == "cuda",
        worker_init_fn=ignore_sigint,
        # The loader's own generator, so that building an iterator does not draw from the global RNG that
        # dropout uses: a resumed run then draws what the uninterrupted one drew.
        generator=torch.Generator(),
    )
    train_loader = DataLoader(train_data, batch_size, sampler=sampler, drop_last=True, **loader_opts)
    val_loader = None
    if source.val_items:
        val_set = dataset(source.val_items, False)
        shard = Shard(len(val_set), job.rank, job.world)
        val_loader = DataLoader(val_set, batch_size, sampler=shard, **loader_opts)
    epochs = math.ceil(total_steps / steps_per_epoch)
    return Data(
        source, data_cfg, train_data, sampler, train_loader, val_loader, batch_size, steps_per_epoch,
        total_steps, epochs, SkipCounter(),
    )  # fmt: skip


def model_and_optimizer(job: Job, data: Data) -> Learner:
    cfg, device = job.cfg, job.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    spec = ckpt_io.model_spec(cfg.preset, len(data.classes), model_overrides(cfg))
    model = ckpt_io.build_model(spec).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    amp_dtype = None
    if cfg.amp:
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if device.type == "cpu" or gpu_bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Learner(model, model, optimizer, scaler, amp_dtype, spec)


def restore(job: Job, learner: Learner, data: Data, ckpt: dict | None) -> Progress:
    """A fresh start, or the state of the checkpoint resumed: weights, optimizer, counters, RNG."""
    progress = Progress(Accumulator(len(data.classes)))
    if ckpt is None:
        # Dropout differs between ranks; the model's initial weights (drawn above) do not.
        torch.manual_seed(job.cfg.seed + job.rank)
        return progress
    try:
        learner.model.load_state_dict(ckpt["model"])
        learner.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CLIError(f"checkpoint {ckpt['path']!r} does not fit this model: {e}") from None
    learner.scaler.load_state_dict(ckpt["scaler"])
    progress.step, progress.epoch, progress.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    progress.history, progress.train_seconds = ckpt["history"], ckpt["train_seconds"]
    progress.best_top1 = ckpt["best_top1"]
    accs, states, rank = ckpt["train_acc"], ckpt["rng"], job.rank
    progress.train_acc.load_state(accs[rank] if rank < len(accs) else progress.train_acc.state())
    ckpt_io.set_rng_state(states[rank] if rank < len(states) else states[0])
    if ckpt.get("world", 1) != job.world:
        job.log(
            f"note: resuming a {ckpt.get('world', 1)}-process run with {job.world}: the data order changes"
        )
    job.log(
        f"resumed from {ckpt['path']} at step {progress.step} "
        f"(epoch {progress.epoch + 1}, batch {progress.position})"
    )
    return progress


def parallel(job: Job, model: torch.nn.Module) -> torch.nn.Module:
    """The model as the steps call it: compiled with --compile, and in DDP under torchrun."""
    if job.cfg.compile:
        model = torch.compile(model)
    if job.ddp:
        device_ids = [job.device] if job.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def describe(job: Job, data: Data, learner: Learner) -> str:
    cfg, source = job.cfg, data.source
    n_params = sum(p.numel() for p in learner.model.parameters())
    times = f" x {job.world}" if job.ddp else ""
    return (
        f"{source.name}: {len(source.train_items)} training / {len(source.val_items)} validation videos, "
        f"{len(data.classes)} classes | {cfg.preset} ({n_params / 1e6:.2f} M parameters) on {job.device}"
        f"{times}, backend {cfg.backend} | {data.epochs} epochs of {data.steps_per_epoch} steps, batch "
        f"{data.batch_size}{times} | {job.out}"
    )


def run_epoch(job: Job, data: Data, learner: Learner, progress: Progress, stop: StopSignal) -> bool:
    """The steps of one epoch from where it stands; False when a signal or --stop-after stopped it."""
    from tqdm import tqdm

    cfg = job.cfg
    data.sampler.set_position(progress.epoch, progress.position * data.batch_size)
    data.train_data.epoch = progress.epoch
    learner.net.train()
    bar = tqdm(
        total=data.steps_per_epoch,
        initial=progress.position,
        desc=f"epoch {progress.epoch + 1}/{data.epochs}",
        # None: tqdm shows the bar on a terminal only, so logs and CI output get the epoch lines alone
        disable=None if (job.master and cfg.progress) else True,
        dynamic_ncols=True,
        leave=False,
    )
    t0 = rate_t0 = time.perf_counter()
    clips = 0
    batches = iter(data.train_loader)
    completed = True
    while progress.position < data.steps_per_epoch and progress.step < data.total_steps:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception:
            if stop.name is None:
                raise
            completed = False  # a worker was stopped by the signal as well
            break
        data.skips.update(batch)
        if job.agree(batch["label"].numel() > 0, dist.ReduceOp.MIN):
            progress.lr = lr_at(progress.step, data.total_steps, cfg)
            loss, n = train_step(job, learner, progress, batch)
            clips += n
            rate = clips * job.world / (time.perf_counter() - rate_t0)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{progress.lr:.2e}", clips_s=f"{rate:.1f}")
            if job.writer is not None:
                job.writer.add_scalar("train/loss_step", loss, progress.step)
                job.writer.add_scalar("train/lr", progress.lr, progress.step)
        progress.step += 1
        progress.position += 1
        progress.steps_this_run += 1
        bar.update(1)
        stopping = stop.name is not None or (cfg.stop_after and progress.steps_this_run >= cfg.stop_after)
        if job.agree(stopping, dist.ReduceOp.MAX):
            completed = False
            break
        if (
            cfg.ckpt_every
            and progress.step % cfg.ckpt_every == 0
            and progress.position < data.steps_per_epoch
        ):
            progress.train_seconds += time.perf_counter() - t0  # saving is not training time
            save_last(job, data, learner, progress)
            t0 = time.perf_counter()
    bar.close()
    progress.train_seconds += time.perf_counter() - t0
    return completed


def train_step(job: Job, learner: Learner, progress: Progress, batch: dict) -> tuple[float, int]:
    """One optimizer step at progress.lr; returns the loss and the clips it saw."""
    for group in learner.optimizer.param_groups:
        group["lr"] = progress.lr
    batch = to_device(batch, job.device)
    labels = batch["label"]
    amp = learner.amp_dtype
    with torch.autocast(job.device.type, dtype=amp, enabled=amp is not None):
        output = learner.net(batch)
        loss = learner.model.loss(output, labels)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    if job.cfg.grad_clip > 0:
        learner.scaler.unscale_(learner.optimizer)
        torch.nn.utils.clip_grad_norm_(learner.model.parameters(), job.cfg.grad_clip)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    loss_value = loss.item()
    progress.train_acc.update(output["logits"], labels, loss_value)
    return loss_value, labels.numel()


def end_of_epoch(job: Job, data: Data, learner: Learner, progress: Progress) -> None:
    """Counts from every rank, validation, the epoch's row, the plots and the checkpoints."""
    cfg, p = job.cfg, progress
    if job.ddp:
        state = p.train_acc.state()
        dist.all_reduce(state)
        p.train_acc.load_state(state)
    train_metrics = p.train_acc.compute()
    row = {"epoch": p.epoch + 1, "step": p.step, "time": p.train_seconds, "lr": p.lr}
    row.update({f"train_{k}": train_metrics[k] for k in _run.METRIC_KEYS})
    last_epoch = p.step >= data.total_steps
    if data.val_loader is not None and ((p.epoch + 1) % cfg.eval_every == 0 or last_epoch):
        # Without the DDP wrapper: the ranks' shards may differ by a batch, and eval needs no sync.
        net = learner.net.module if job.ddp else learner.net
        gather = job.gather if job.ddp else None
        result = infer(net, data.val_loader, learner.model.loss, job.device, learner.amp_dtype, gather)
        if result is not None:
            clip_m, video_m = validation_metrics(result, len(data.classes))
            row.update({f"val_{k}": video_m[k] for k in _run.METRIC_KEYS})
            row.update({f"val_clip_{k}": clip_m[k] for k in _run.METRIC_KEYS})
            data.skips.add(result["skipped"])
    skipped = row["skipped"] = data.skips.end_epoch(p.epoch + 1)
    p.history.append(row)
    p.epoch += 1
    p.position = 0
    p.train_acc = Accumulator(len(data.classes))
    if job.master:
        job.log(_run.epoch_line(row, data.epochs))
        _run.record_epoch(job.out, p.history, job.writer)
    improved = row.get("val_top1", -1.0) > p.best_top1
    if improved:
        p.best_top1 = row["val_top1"]
    save_last(job, data, learner, progress)
    if improved and job.master:
        ckpt_io.atomic_save({**identity(job, data, learner, p), "kind": ckpt_io.WEIGHTS}, job.out / "best.pt")
    if train_metrics["count"] == 0:
        raise CLIError(f"epoch {p.epoch}: no training video could be decoded (skipped {skipped} files)")


def identity(job: Job, data: Data, learner: Learner, progress: Progress) -> dict:
    """What both checkpoints hold: the weights and what builds and feeds the model again."""
    return {
        "format": ckpt_io.FORMAT,
        "model": learner.model.state_dict(),
        "config": ckpt_io.plain(dataclasses.asdict(job.cfg)),
        "model_spec": learner.spec,
        "data_config": ckpt_io.data_config_to_dict(data.config),
        "classes": data.classes,
        "source": data.source.name,
        "step": progress.step,
        "epoch": progress.epoch,
        "best_top1": progress.best_top1,
    }


def save_last(job: Job, data: Data, learner: Learner, progress: Progress) -> None:
    """last.pt, the training state: every rank takes part (RNG states and counts are gathered), rank 0
    writes."""
    states = job.gather(ckpt_io.rng_state())
    accs = job.gather(progress.train_acc.state())
    if not job.master:
        return
    state = {
        **identity(job, data, learner, progress),
        "kind": ckpt_io.TRAINING,
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "position": progress.position,
        "history": progress.history,
        "train_seconds": progress.train_seconds,
        "train_acc": accs,
        "rng": states,
        "world": job.world,
    }
    ckpt_io.atomic_save(state, job.out / "last.pt")


def stopped(job: Job, data: Data, learner: Learner, progress: Progress, stop: StopSignal) -> dict:
    save_last(job, data, learner, progress)
    why = stop.name or f"--stop-after {job.cfg.stop_after}"
    job.log(f"stopped by {why} at step {progress.step}; saved {job.out / 'last.pt'} (continue with --resume)")
    if stop.name is not None:
        sys.exit(130 if stop.name == "SIGINT" else 143)
    return {"stopped": progress.step}


def summary(job: Job, data: Data, learner: Learner, progress: Progress) -> dict | None:
    """The last epoch's metrics, convergence time, per-video inference time: summary.json and summary.md."""
    if not job.master:
        return None
    cfg, model, last = job.cfg, learner.model, progress.history[-1] if progress.history else {}
    result = {
        "preset": cfg.preset,
        "data": data.source.name,
        "modalities": list(getattr(model.config, "modalities", ())),
        "dropout": getattr(model.config, "dropout", None),
        **{split: {k: last[f"{split}_{k}"] for k in _run.METRIC_KEYS if f"{split}_{k}" in last}
           for split in ("train", "val", "val_clip")},
        "best_val_top1": progress.best_top1,
        "converged": _run.convergence(progress.history),
        "train_seconds": progress.train_seconds,
        "steps": progress.step,
        "epochs": progress.epoch,
        "device": str(job.device),
        "world": job.world,
    }  # fmt: skip
    if data.val_loader is not None and cfg.inference_videos > 0:
        items = data.source.val_items[: cfg.inference_videos]
        result["inference"] = time_inference(model, items, data.config, job.device, data.source.use_titles)
    result["wall_seconds"] = time.perf_counter() - job.started
    _run.write_summary(job.out, result, job.log)
    return result


if __name__ == "__main__":
    sys.exit(main())
