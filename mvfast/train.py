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
    python -m mvfast.train --data csv --data-root new.csv --init-from runs/x/best.pt  # new classes, new run
    python -m mvfast.train ... --init-from runs/x/best.pt --freeze scene --lr-mult behaviour=0.1
    python -m mvfast.train --data csv --data-root tags.csv --multi-label --class-weights auto
    python -m mvfast.train --optimizer sgd --lr 0.01 --accumulate 4 --ema --patience 3
    torchrun --nproc_per_node 2 -m mvfast.train                # DDP: gloo on CPU, nccl on GPUs

Every setting below is a flag; model config fields without a flag of their own: --set name=value.

Each run gets its own folder: --out, or else runs/train (runs/train-2, ... when that holds a run). An --out
that holds a run is refused unless --resume continues it or --force starts over. The folder gets
config.yaml (the resolved settings), train.log (what the console showed), last.pt (the training state,
every --ckpt-every steps and at each epoch end), best.pt (the weights of the best validation top-1, or mAP
with --multi-label, with what evaluate and predict need; the averaged weights with --ema), metrics.csv (a
row per epoch), precision.png and loss.png (the paper's Fig. 3 and 4), summary.md / summary.json (the rows
of Table 1), tensorboard/ with --tensorboard.
Ctrl-C (or SIGTERM) saves last.pt at the next step boundary and exits; --resume continues bit for bit.
"""

from __future__ import annotations

import contextlib
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
    parse_lr_mult,
    parse_parts,
    resolve,
    to_yaml,
)
from mvfast._inference import infer, scores, time_inference, validation_metrics
from mvfast._optim import auto_class_weights, check_parts, lr_at, param_groups, part_of, sync_batchnorm
from mvfast.data.samplers import ResumableSampler, SeededClips, Shard, ignore_sigint
from mvfast.metrics import Accumulator, MultiLabelAccumulator

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
    ema: torch.optim.swa_utils.AveragedModel | None = None  # with --ema
    frozen: tuple = ()  # --freeze: module names kept in eval mode
    multi_label: bool = False

    @property
    def monitor(self) -> str:
        """The validation metric that chooses best.pt and stops early."""
        return "map" if self.multi_label else "top1"

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that validation, best.pt and the summary use: the average with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def new_accumulator(self, num_classes: int, threshold: float):
        if self.multi_label:
            return MultiLabelAccumulator(num_classes, threshold)
        return Accumulator(num_classes)


@dataclass
class Progress:
    """The counters a checkpoint holds besides the model and the optimizer."""

    train_acc: Accumulator | MultiLabelAccumulator
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch done
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    best_top1: float = -1.0  # the best validation value of the learner's monitor (top-1, or mAP)
    lr: float = 0.0
    steps_this_run: int = 0
    stale: int = 0  # validations since the monitor last improved (--patience)
    early_stopped: bool = False


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
            while progress.step < data.total_steps and not progress.early_stopped:
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
            items, source.classes, data_cfg, training, cfg.cache, source.use_titles, source.name,
            multi_label=cfg.multi_label,
        )  # fmt: skip
        ds.log_skips = False  # the loop's SkipCounter reports them, once per file
        return ds

    train_set = dataset(source.train_items, True)
    train_data = SeededClips(train_set, cfg.seed)
    sampler = ResumableSampler(train_data, job.world, job.rank, cfg.seed)
    batch_size = cfg.batch_size
    if sampler.num_samples < batch_size:
        batch_size = sampler.num_samples
        log(f"batch size lowered to {batch_size}: the training set has {len(train_set)} videos")
    # An optimizer step takes --accumulate batches (the last step of an epoch those that are left).
    steps_per_epoch = math.ceil((sampler.num_samples // batch_size) / cfg.accumulate)
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
    """The model (from --init-from's weights, with --freeze, SyncBatchNorm), its optimizer and EMA."""
    cfg, device = job.cfg, job.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    overrides = model_overrides(cfg)
    if cfg.class_weights == "auto":
        weights = auto_class_weights(data.source.train_items, len(data.classes), cfg.multi_label)
        overrides["class_weights"] = [round(w, 6) for w in weights]
        job.log(f"class weights (auto): {min(weights):.3g} to {max(weights):.3g}")
    spec = ckpt_io.model_spec(cfg.preset, len(data.classes), overrides)
    model = ckpt_io.build_model(spec)
    fresh = []  # tensors --init-from left as initialised
    if cfg.init_from and not job.cfg.resume:
        lines, fresh = ckpt_io.init_from(model, cfg.init_from, data.classes, cfg.preset)
        for line in lines:
            job.log(line)
    frozen = parse_parts(cfg.freeze, "--freeze")
    lr_mult = parse_lr_mult(cfg.lr_mult)
    check_parts(model, frozen, "--freeze")
    check_parts(model, lr_mult, "--lr-mult")
    unlearnt = [k for k in fresh if part_of(k, frozen)]
    if unlearnt:
        job.log(
            f"warning: --freeze keeps {len(unlearnt)} freshly initialised tensors as they are: {unlearnt[:4]}"
        )
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise CLIError(f"--freeze {cfg.freeze}: nothing is left to train")
    model = model.to(device)
    if cfg.sync_bn and job.ddp and device.type == "cuda":
        job.log(f"SyncBatchNorm: {sync_batchnorm(model)} BatchNorm layers, statistics over {job.world} GPUs")
    elif cfg.sync_bn:
        job.log("note: --sync-bn ignored: it applies under torchrun on GPUs only")
    groups = param_groups(model, cfg.weight_decay, lr_mult)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
    amp_dtype = None
    if cfg.amp:
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if device.type == "cpu" or gpu_bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Learner(model, model, optimizer, scaler, amp_dtype, spec, ema, frozen, cfg.multi_label)


def restore(job: Job, learner: Learner, data: Data, ckpt: dict | None) -> Progress:
    """A fresh start, or the state of the checkpoint resumed: weights, optimizer, counters, RNG."""
    progress = Progress(learner.new_accumulator(len(data.classes), job.cfg.threshold))
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
    if learner.ema is not None:
        if "ema" not in ckpt:
            raise CLIError(f"checkpoint {ckpt['path']!r} was written without --ema: resume without it")
        learner.ema.load_state_dict(ckpt["ema"])
    progress.step, progress.epoch, progress.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    progress.history, progress.train_seconds = ckpt["history"], ckpt["train_seconds"]
    progress.best_top1 = ckpt["best_top1"]
    progress.stale, progress.early_stopped = ckpt.get("stale", 0), ckpt.get("early_stopped", False)
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
        f"{data.batch_size}{times}{f' x {cfg.accumulate} accumulated' if cfg.accumulate > 1 else ''} | "
        f"{job.out}"
    )


def run_epoch(job: Job, data: Data, learner: Learner, progress: Progress, stop: StopSignal) -> bool:
    """The steps of one epoch from where it stands; False when a signal or --stop-after stopped it."""
    from tqdm import tqdm

    cfg = job.cfg
    data.sampler.set_position(progress.epoch, progress.position * data.batch_size * cfg.accumulate)
    data.train_data.epoch = progress.epoch
    learner.net.train()
    for name in learner.frozen:  # frozen parts keep their BatchNorm statistics, and no dropout
        learner.model.get_submodule(name).eval()
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
        step_batches = []
        try:
            for _ in range(cfg.accumulate):
                step_batches.append(next(batches))
        except StopIteration:
            if not step_batches:
                break
        except Exception:
            if stop.name is None:
                raise
            completed = False  # a worker was stopped by the signal as well
            break
        for batch in step_batches:
            data.skips.update(batch)
        # a batch in which every file failed is left out, on every rank alike (DDP syncs each backward)
        step_batches = [b for b in step_batches if job.agree(b["label"].numel() > 0, dist.ReduceOp.MIN)]
        if step_batches:
            progress.lr = lr_at(progress.step, data.total_steps, cfg)
            loss, n = train_step(job, learner, progress, step_batches)
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


def train_step(job: Job, learner: Learner, progress: Progress, batches: list[dict]) -> tuple[float, int]:
    """One optimizer step at progress.lr over the gradients of `batches` (--accumulate of them, each
    loss divided by their number); returns the mean loss and the clips it saw."""
    for group in learner.optimizer.param_groups:
        group["lr"] = progress.lr * group.get("lr_mult", 1.0)
    amp = learner.amp_dtype
    learner.optimizer.zero_grad(set_to_none=True)
    loss_sum, clips = 0.0, 0
    for i, batch in enumerate(batches):
        batch = to_device(batch, job.device)
        labels = batch["label"]
        # DDP averages the gradients over the processes at the last batch's backward only
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not job.ddp else learner.net.no_sync()
        with sync:
            with torch.autocast(job.device.type, dtype=amp, enabled=amp is not None):
                output = learner.net(batch)
                loss = learner.model.loss(output, labels)
            learner.scaler.scale(loss / len(batches)).backward()
        loss_value = loss.item()
        logits = output["logits"]
        progress.train_acc.update(scores(logits, True) if learner.multi_label else logits, labels, loss_value)
        loss_sum += loss_value
        clips += labels.shape[0]
    if job.cfg.grad_clip > 0:
        learner.scaler.unscale_(learner.optimizer)
        torch.nn.utils.clip_grad_norm_(learner.model.parameters(), job.cfg.grad_clip)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return loss_sum / len(batches), clips


def end_of_epoch(job: Job, data: Data, learner: Learner, progress: Progress) -> None:
    """Counts from every rank, validation, the epoch's row, the plots and the checkpoints."""
    cfg, p = job.cfg, progress
    if job.ddp:
        state = p.train_acc.state()
        dist.all_reduce(state)
        p.train_acc.load_state(state)
    train_metrics = p.train_acc.compute()
    keys = _run.metric_keys(learner.multi_label)
    row = {"epoch": p.epoch + 1, "step": p.step, "time": p.train_seconds, "lr": p.lr}
    row.update({f"train_{k}": train_metrics[k] for k in keys if k in train_metrics})
    last_epoch = p.step >= data.total_steps
    validated = False
    if data.val_loader is not None and ((p.epoch + 1) % cfg.eval_every == 0 or last_epoch):
        # Without the DDP wrapper: the ranks' shards may differ by a batch, and eval needs no sync.
        net = learner.evaluated if learner.ema is not None else learner.net.module if job.ddp else learner.net
        gather = job.gather if job.ddp else None
        result = infer(net, data.val_loader, learner.model.loss, job.device, learner.amp_dtype, gather)
        if result is not None:
            clip_m, video_m = validation_metrics(
                result, len(data.classes), learner.multi_label, cfg.threshold
            )
            row.update({f"val_{k}": video_m[k] for k in keys})
            row.update({f"val_clip_{k}": clip_m[k] for k in keys})
            data.skips.add(result["skipped"])
            validated = True
    skipped = row["skipped"] = data.skips.end_epoch(p.epoch + 1)
    p.history.append(row)
    p.epoch += 1
    p.position = 0
    p.train_acc = learner.new_accumulator(len(data.classes), cfg.threshold)
    if job.master:
        job.log(_run.epoch_line(row, data.epochs))
        _run.record_epoch(job.out, p.history, job.writer)
    monitor = f"val_{learner.monitor}"
    improved = row.get(monitor, -1.0) > p.best_top1
    if improved:
        p.best_top1, p.stale = row[monitor], 0
    elif validated:
        p.stale += 1
    if cfg.patience and p.stale >= cfg.patience and not last_epoch:
        p.early_stopped = True
        job.log(
            f"early stop: validation {learner.monitor} has not improved for {p.stale} validations "
            f"(best {p.best_top1:.3f})"
        )
    save_last(job, data, learner, progress)
    if improved and job.master:
        ckpt_io.atomic_save({**identity(job, data, learner, p), "kind": ckpt_io.WEIGHTS}, job.out / "best.pt")
    if train_metrics["count"] == 0:
        raise CLIError(f"epoch {p.epoch}: no training video could be decoded (skipped {skipped} files)")


def identity(job: Job, data: Data, learner: Learner, progress: Progress) -> dict:
    """What both checkpoints hold: the weights and what builds and feeds the model again."""
    return {
        "format": ckpt_io.FORMAT,
        "model": learner.evaluated.state_dict(),
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
        "model": learner.model.state_dict(),  # the weights trained; with --ema their average is "ema"
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "position": progress.position,
        "history": progress.history,
        "train_seconds": progress.train_seconds,
        "train_acc": accs,
        "rng": states,
        "world": job.world,
        "stale": progress.stale,
        "early_stopped": progress.early_stopped,
    }
    if learner.ema is not None:
        state["ema"] = learner.ema.state_dict()
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
    cfg, model, last = job.cfg, learner.evaluated, progress.history[-1] if progress.history else {}
    keys = _run.metric_keys(learner.multi_label)
    result = {
        "preset": cfg.preset,
        "data": data.source.name,
        "modalities": list(getattr(model.config, "modalities", ())),
        "dropout": getattr(model.config, "dropout", None),
        **{split: {k: last[f"{split}_{k}"] for k in keys if f"{split}_{k}" in last}
           for split in ("train", "val", "val_clip")},
        f"best_val_{learner.monitor}": progress.best_top1,
        "early_stopped": progress.early_stopped,
        "converged": _run.convergence(progress.history, learner.monitor),
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
