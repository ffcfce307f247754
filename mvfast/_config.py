"""The settings of a training run: one typed block (:class:`TrainConfig`), its flags, YAML file and checks.

Every field is a flag (``batch_size`` is ``--batch-size``) whose help text is the field's metadata; a YAML
file (``--config``) sets any of them, flags win over it, and with ``--resume`` the checkpoint's settings come
first: defaults < checkpoint < YAML < flags. :func:`check` and :func:`model_config` catch a wrong setting
before any data is read or generated.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mvfast._checkpoint import latest_checkpoint, load_checkpoint, plain, require_training_state
from mvfast._cli import BACKEND_HELP, DEVICE_HELP, CLIError

DEFAULT_OUT = "runs/train"
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


def setting(default, help: str, *, shown: str | None = None, data: bool = False, invocation: bool = False):
    """A TrainConfig field. `shown`: the default as --help states it, where the value itself says little
    (None); `data`: a setting that chooses the videos, which evaluate takes too; `invocation`: a setting of
    one invocation, not of the run, so never taken from a checkpoint that is resumed."""
    meta = {"help": help, "shown": shown, "data": data, "invocation": invocation}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run, in the order --help lists them; each field's help text and the default
    --help shows are its metadata (:func:`setting`)."""

    # data
    data: str = setting(
        "synthetic",
        "the videos: synthetic (the embedded set, generated once), ucf101 (the official layout), folder "
        "(one sub-folder per class) or csv (a manifest with columns path,label[,title][,split])",
        data=True,
    )
    data_root: str | None = setting(
        None,
        "the UCF101 root, the folder of class folders or the CSV file; for synthetic, the folder the sets "
        "are generated in",
        shown="$MVFAST_CACHE/synthetic, else ~/.cache/mvfast/synthetic, for synthetic",
        data=True,
    )
    split: int = setting(1, "UCF101 split: 1, 2 or 3", data=True)
    val_root: str | None = setting(
        None,
        "folder data: a validation folder with the same class sub-folders",
        shown="--val-fraction of --data-root held out",
        data=True,
    )
    train_split: str = setting(
        "train", "csv data with a split column: the value of the training rows", data=True
    )
    val_split: str = setting(
        "test", "csv data with a split column: the value of the validation rows", data=True
    )
    val_fraction: float = setting(
        0.2,
        "folder data without --val-root and csv data without a split column: the fraction of each class's "
        "videos held out for validation",
        data=True,
    )
    synthetic_classes: int = setting(10, "synthetic set: classes", data=True)
    synthetic_videos: int = setting(
        24, "synthetic set: videos per class (2/3 train, 1/3 validation)", data=True
    )
    synthetic_size: int = setting(128, "synthetic set: frame side in pixels", data=True)
    synthetic_seconds: float = setting(4.0, "synthetic set: seconds per video", data=True)
    synthetic_seed: int = setting(0, "synthetic set: the seed it is generated from", data=True)
    fps: float = setting(12.5, "frames per second of the decoded timeline")
    resize: int = setting(
        128,
        "decoded frames are resized and centre-cropped to this square, which is what the cache keeps; a "
        "preset that fixes its own (tiny: 80) overrides it",
    )
    test_clips: int = setting(
        3, "clips per validation video, averaged for the video-level metrics", data=True
    )
    cache: bool = setting(
        True,
        "cache decoded videos on disk ($MVFAST_CACHE, else ~/.cache/mvfast), so that later epochs read "
        "arrays instead of decoding",
        data=True,
    )
    workers: int = setting(2, "DataLoader worker processes", data=True, invocation=True)
    # model
    preset: str = setting(
        "tiny",
        "the model: tiny (trains on a CPU in minutes), paper (the paper's sizes) or frame2d (the "
        "per-frame 2D CNN baseline of Table 1)",
    )
    modalities: str | None = setting(
        None,
        "comma-separated inputs the model uses, a subset of rgb,motion,frames,audio,text (an ablation)",
        shown="the preset's",
    )
    dropout: float | None = setting(
        None, "dropout before the classifier (the paper's Table 2)", shown="the preset's"
    )
    overrides: dict = setting(
        {},
        "any other field of the model's config, e.g. --set frame_clusters=32 (repeatable; the value is read "
        "as YAML)",
        shown="none",
    )
    # labels and loss
    multi_label: bool = setting(
        False,
        "each video has any number of classes (csv data: labels as a|b|c): binary cross-entropy with logits, "
        "a sigmoid per class, and mAP and F1 instead of top-1 for choosing best.pt and early stopping",
    )
    threshold: float = setting(
        0.5, "multi-label: a class is predicted where its score is at least this (F1, precision, recall)"
    )
    label_smoothing: float = setting(0.0, "label smoothing of the loss, in [0, 1)")
    class_weights: str = setting(
        "none",
        "none, or auto: per-class loss weights from the training labels (single-label: N / (C * videos of "
        "the class); multi-label: BCE's pos_weight, negatives / positives of the class)",
    )
    # fine-tuning
    init_from: str | None = setting(
        None,
        "start a new run from the weights of a checkpoint (or an exported folder): every tensor whose name "
        "and shape match is loaded, and the classifier and behaviour heads are re-initialised when the "
        "classes differ; the log lists what was loaded and what not, and why",
        shown="off",
    )
    freeze: str | None = setting(
        None,
        "comma-separated parts of the model to keep as they are (no gradient, BatchNorm statistics kept), "
        "e.g. scene,behaviour or behaviour.rgb",
        shown="none",
    )
    lr_mult: str | None = setting(
        None, "learning-rate multipliers of parts of the model, e.g. scene=0.1,behaviour=0.5", shown="none"
    )
    # optimisation
    epochs: int = setting(10, "passes over the training set")
    steps: int | None = setting(
        None, "total optimizer steps; replaces --epochs when given", shown="--epochs passes"
    )
    batch_size: int = setting(8, "clips per step and process")
    accumulate: int = setting(
        1,
        "batches whose gradients are added up for each optimizer step (an effective batch of N times "
        "--batch-size)",
    )
    optimizer: str = setting("adamw", "adamw (betas 0.9, 0.95) or sgd (with --momentum)")
    momentum: float = setting(0.9, "the momentum of --optimizer sgd")
    lr: float = setting(2e-3, "peak learning rate, reached at the end of the warm-up")
    schedule: str = setting(
        "cosine", "the learning rate after the warm-up: cosine or linear (down to --min-lr), or constant"
    )
    warmup_steps: int = setting(20, "steps of linear warm-up from 0 to --lr")
    min_lr: float = setting(1e-5, "where the cosine and linear schedules end")
    weight_decay: float = setting(0.05, "weight decay (not applied to biases and norm weights)")
    grad_clip: float = setting(1.0, "largest gradient norm; 0 turns clipping off")
    ema: bool = setting(
        False,
        "keep an exponential moving average of the weights (torch.optim.swa_utils.AveragedModel, buffers "
        "too): validation, best.pt and the summary use it",
    )
    ema_decay: float = setting(0.999, "--ema: the average's decay per optimizer step")
    patience: int = setting(
        0,
        "stop when validation top-1 (mAP with --multi-label) has not improved for this many validations; 0 "
        "never stops early",
    )
    seed: int = setting(0, "seed of the model's initial weights, augmentation, data order and dropout")
    # system
    device: str = setting("auto", DEVICE_HELP)
    backend: str = setting("auto", BACKEND_HELP)
    amp: bool = setting(False, "mixed precision: bfloat16 where supported, else float16 with loss scaling")
    compile: bool = setting(False, "torch.compile the model")
    sync_bn: bool = setting(
        False,
        "under torchrun on GPUs, BatchNorm statistics over all processes (SyncBatchNorm; the fused "
        "Conv+BN+ReLU blocks then run unfused); ignored on CPUs and in one process",
    )
    threads: int = setting(0, "torch intra-op threads; 0 leaves the number to PyTorch", invocation=True)
    # output
    out: str | None = setting(
        None,
        "the run folder; one that holds a run (last.pt, best.pt or summary.json) is refused unless "
        "--resume or --force",
        shown=f"{DEFAULT_OUT}, or {DEFAULT_OUT}-2, {DEFAULT_OUT}-3, ... when that holds a run",
        invocation=True,
    )
    resume: str | None = setting(
        None,
        f"continue a run exactly: alone, from last.pt in --out ({DEFAULT_OUT} if not given); with a file, "
        "from that checkpoint",
        shown="off",
        invocation=True,
    )
    force: bool = setting(
        False,
        "start a new run in an --out that holds one, deleting its checkpoints, metrics, plots and log",
        invocation=True,
    )
    ckpt_every: int = setting(
        100, "steps between checkpoints (last.pt, also written at every epoch end); 0: epoch ends only"
    )
    eval_every: int = setting(1, "epochs between validations (the last epoch is always validated)")
    tensorboard: bool = setting(
        False, "TensorBoard logs in OUT/tensorboard (skipped with a note when tensorboard is not installed)"
    )
    progress: bool = setting(
        True, "a progress bar with the loss, learning rate and clips/s (on a terminal only)", invocation=True
    )
    stop_after: int = setting(
        0,
        "stop after this many steps of this invocation and save last.pt, as a preempted job would "
        "(--resume continues); 0 runs to the end",
        invocation=True,
    )
    inference_videos: int = setting(
        8, "validation videos timed for the summary's per-video inference time; 0 skips the timing"
    )


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
DATA_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["data"])
INVOCATION_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["invocation"])


# ---------------------------------------------------------------------------------------------------------
# Flags and files


def build_parser(prog: str, description: str = "", fields=None, shown: str | None = None):
    """Flags for the TrainConfig fields (all of them, or `fields`); values absent from argv stay unset.
    `shown` replaces every default in the help text (evaluate: "the checkpoint's")."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, f in FIELDS.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        default = shown or f.metadata["shown"] or (f.default if f.default is not dataclasses.MISSING else {})
        help_ = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        if name == "overrides":
            parser.add_argument("--set", dest="overrides", action="append", metavar="NAME=VALUE", help=help_)
        elif name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", metavar="CHECKPOINT", help=help_)
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, metavar=name.upper(), help=help_)
    return parser


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise CLIError(f"config file {path!r}: unknown settings {unknown}")
    return values


def resolve(argv, prog: str, description: str) -> tuple[TrainConfig, dict | None]:
    """The run's settings, checked, and with --resume the checkpoint they continue."""
    parser = build_parser(prog, description)
    parser.add_argument(
        "--config", metavar="YAML", help="a YAML file of these settings; flags override it (default: none)"
    )
    args = vars(parser.parse_args(argv))
    file_values = read_yaml(args.pop("config")) if "config" in args else {}
    values = {**file_values, **args}
    if "overrides" in values:
        values["overrides"] = _overrides(values["overrides"])
    ckpt = None
    resume = values.get("resume")
    if resume:
        if values.get("force"):
            raise CLIError("--resume continues a run and --force starts a new one: give one of them")
        if values.get("init_from"):
            raise CLIError(
                "--resume continues a run and --init-from starts a new one from weights: give one of them"
            )
        folder = Path(values.get("out") or DEFAULT_OUT)
        path = latest_checkpoint(folder) if resume == "auto" else Path(resume)
        if path is None:
            raise CLIError(f"--resume: no checkpoint (last.pt) in {str(folder)!r}")
        ckpt = require_training_state(load_checkpoint(path))
        stored = {k: v for k, v in ckpt["config"].items() if k in FIELDS and k not in INVOCATION_FIELDS}
        values = {**stored, **values}
        values.setdefault("out", str(folder) if resume == "auto" else str(Path(ckpt["path"]).parent))
    cfg = TrainConfig(**values)
    check(cfg)
    return cfg, ckpt


def to_yaml(cfg: TrainConfig, data_config) -> str:
    """config.yaml: the resolved settings and the data config they give."""
    import yaml

    from mvfast._checkpoint import data_config_to_dict

    resolved = plain(dataclasses.asdict(cfg))
    resolved["data_config"] = data_config_to_dict(data_config)
    return yaml.safe_dump(resolved, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------
# Checks, and what the settings give: the model's config, the data config, the videos


def check(cfg: TrainConfig) -> None:
    """Every setting on its own (the model's fields are checked by :func:`model_config`)."""
    from mvfast.data.sources import check_kind

    at_least = {
        "epochs": 1, "batch_size": 1, "test_clips": 1, "synthetic_classes": 1, "synthetic_videos": 1,
        "resize": 1, "eval_every": 1, "workers": 0, "warmup_steps": 0, "ckpt_every": 0, "stop_after": 0,
        "threads": 0, "inference_videos": 0,
    }  # fmt: skip
    for name, least in at_least.items():
        if getattr(cfg, name) < least:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {cfg.steps}")
    if not cfg.lr > 0:
        raise CLIError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.accumulate < 1:
        raise CLIError(f"--accumulate must be >= 1, got {cfg.accumulate}")
    if cfg.patience < 0:
        raise CLIError(f"--patience must be >= 0, got {cfg.patience}")
    if cfg.optimizer not in OPTIMIZERS:
        raise CLIError(f"unknown --optimizer {cfg.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
    if not 0 <= cfg.momentum < 1:
        raise CLIError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 < cfg.ema_decay < 1:
        raise CLIError(f"--ema-decay must be in (0, 1), got {cfg.ema_decay}")
    if not 0 < cfg.threshold < 1:
        raise CLIError(f"--threshold must be in (0, 1), got {cfg.threshold}")
    if not 0 <= cfg.label_smoothing < 1:
        raise CLIError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.class_weights not in ("none", "auto"):
        raise CLIError(f"--class-weights must be none or auto, got {cfg.class_weights!r}")
    parse_parts(cfg.freeze, "--freeze")
    parse_lr_mult(cfg.lr_mult)
    if cfg.schedule not in SCHEDULES:
        raise CLIError(f"unknown --schedule {cfg.schedule!r}; choose {', '.join(SCHEDULES)}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise CLIError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 <= cfg.val_fraction <= 1:
        raise CLIError(f"--val-fraction must be in [0, 1], got {cfg.val_fraction}")
    try:
        check_kind(cfg)
    except ValueError as e:
        raise CLIError(str(e)) from None
    parse_modalities(cfg.modalities)


def parse_modalities(value) -> tuple[str, ...] | None:
    """ "rgb,motion" (or a list) -> ("rgb", "motion"); None stays None (the preset's)."""
    from mvfast.models import MODALITIES

    if value is None:
        return None
    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]
    bad = [m for m in names if m not in MODALITIES]
    if bad or not names:
        raise CLIError(
            f"unknown modality {', '.join(bad) or '(none given)'}; choose from {','.join(MODALITIES)}"
        )
    if len(set(names)) != len(names):
        raise CLIError(f"modalities listed twice: {value}")
    return tuple(names)


def parse_parts(value, flag: str) -> tuple[str, ...]:
    """ "scene,behaviour" (or a list) -> ("scene", "behaviour"); None -> (). The names are checked against the
    model's modules when it is built."""
    if value is None:
        return ()
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    if not names:
        raise CLIError(f"{flag}: no part named in {value!r}")
    return tuple(dict.fromkeys(names))


def parse_lr_mult(value) -> dict[str, float]:
    """ "scene=0.1,behaviour=0.5" (or a mapping) -> {"scene": 0.1, "behaviour": 0.5}."""
    if value is None:
        return {}
    items = (
        value.items() if isinstance(value, dict) else [i.split("=", 1) for i in str(value).split(",") if i]
    )
    out = {}
    for item in items:
        if len(item) != 2:
            raise CLIError(f"--lr-mult expects PART=FACTOR[,PART=FACTOR...], got {value!r}")
        name, factor = str(item[0]).strip(), item[1]
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            raise CLIError(f"--lr-mult {name}: the factor must be a number, got {factor!r}") from None
        if not name or factor < 0:
            raise CLIError(f"--lr-mult expects PART=FACTOR with a factor >= 0, got {value!r}")
        out[name] = factor
    return out


def model_overrides(cfg: TrainConfig) -> dict:
    """The model config fields the settings change: --set, --modalities, --dropout, --multi-label and
    --label-smoothing (class weights, which need the data, are added by train)."""
    overrides = dict(cfg.overrides)
    modalities = parse_modalities(cfg.modalities)
    if modalities is not None:
        overrides["modalities"] = modalities
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if cfg.multi_label:
        overrides["multi_label"] = True
    if cfg.label_smoothing:
        overrides["label_smoothing"] = cfg.label_smoothing
    return overrides


def model_config(cfg: TrainConfig):
    """The model's config for these settings, built (and so checked) before the classes are known: an
    unknown preset or field, or fields that do not fit together, fail here rather than after the data."""
    from mvfast.models import preset_config

    overrides = model_overrides(cfg)
    try:
        # The class count is not known before the data is read; any will do for the checks.
        return preset_config(cfg.preset, 2, **overrides)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot build model {cfg.preset!r} with {overrides or 'no overrides'}: {e}") from None


def data_config(cfg: TrainConfig, inputs):
    """The DataConfig of the settings (fps, resize, test clips) with the model's input sizes."""
    from mvfast.data import DataConfig

    try:
        return DataConfig.for_inputs(inputs, fps=cfg.fps, resize=cfg.resize, test_clips=cfg.test_clips)
    except ValueError as e:
        raise CLIError(f"model {cfg.preset!r} and the data settings do not fit: {e}") from None


def open_source(cfg: TrainConfig, config, classes: list | None = None):
    """:func:`mvfast.data.sources.select` with its errors (missing paths, empty sets, bad layouts, no PyAV
    to generate the synthetic set with) as CLIErrors."""
    from mvfast.data.sources import select

    try:
        return select(cfg, config, classes)
    except ModuleNotFoundError as e:
        if e.name != "av":
            raise
        raise CLIError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
