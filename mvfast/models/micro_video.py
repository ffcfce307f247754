"""The multimodal micro-video classifier of the paper (section 3), reading top-down:

    behaviour  rgb, motion --3D CNNs--> p_rgb, p_motion (N_a each);  f_A = p_rgb + p_motion      eq. 3-5
    scene      frames --VGG16, VGG19--> per-frame scene probabilities, averaged: f_s (N_s)       eq. 1-2
               and per-frame features x_f (F, D_f)
    joint      f = f_A^T f_s, flattened (N_a * N_s)                                                eq. 6
    clusters   NetVLAD(x_f), NetVLAD(audio windows), NetVLAD(title tokens), concatenated          eq. 7-9
    attention  AttentionPool(x_f): a global feature and the weights of the key frames             eq. 10-13
    classifier LayerNorm of each part, concatenation, dropout, linear; the behaviour heads' logits are
               returned too, for an auxiliary loss on the video label

Every input may be absent: a modality not in config.modalities is not built and not read; one that is built
but missing from a batch (no key) contributes exactly what a sample without it contributes (masked NetVLAD
and attention give zeros; missing class probabilities are zeros). Samples without audio or a title are
masked by ``audio_mask`` / ``text_mask`` (and ``has_audio`` / ``has_text``), so the values at masked
positions never reach the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvfast.models.branches import VGG, Behaviour3D
from mvfast.models.config import AUDIO_BINS, MicroVideoConfig, preset_config
from mvfast.nn import AttentionPool, NetVLAD
from mvfast.nn.fuse import fuse


class MicroVideoNet(nn.Module):
    """The paper's model (``architecture="multimodal"``) or the per-frame 2D CNN baseline (``"frame2d"``).

    Build it with :func:`mvfast.models.create_model`. ``model(batch)`` takes the dict of
    :func:`mvfast.data.collate` (rgb (B, 3, T, H, W), motion (B, 2, T, H, W), frames (B, F, 3, h, w),
    audio (B, A, 64) with audio_mask (B, A), text (B, W) with text_mask (B, W), has_audio / has_text (B,);
    other keys are ignored) and returns a dict:

    - ``logits`` (Tensor[B, num_classes]);
    - ``aux_logits``: {"rgb": Tensor[B, num_classes], "motion": ...}, the behaviour heads (empty when there
      are none or their inputs are missing);
    - ``attention`` (Tensor[B, F, H]): the attention weights of the frames (the key frames), or None when the
      model has no attention (frame2d, attention_heads=0, or no "frames" modality).

    ``model(batch, return_features=True)`` adds ``features``, a dict of Tensor[B, ...]: ``embedding`` (the
    classifier's input: the layer-normalised parts concatenated, before dropout; for frame2d the frames' mean
    penultimate feature, which the linear last layer maps to the mean of the frames' logits), and those of
    the parts it computes: ``behaviour`` (f_A, N_a), ``scene`` (f_s, N_s), ``joint`` (N_a * N_s),
    ``frames_vlad``, ``audio_vlad``, ``text_vlad`` (the NetVLAD descriptors), ``attention`` (the pooled frame
    feature, H * D_f) and ``attention_weights`` (F, H).
    """

    def __init__(self, config: MicroVideoConfig):
        super().__init__()
        cfg = self.config = config
        C = cfg.num_classes
        self.frame2d = None
        self.behaviour = nn.ModuleDict()
        self.aux_heads = nn.ModuleDict()
        self.scene = nn.ModuleList()
        self.norms = nn.ModuleDict()
        self.attention = None
        if cfg.architecture == "frame2d":
            self.frame2d = self._vgg(cfg.scene_nets[0], C)
            self._load_scene_weights([self.frame2d])
            return

        # Behaviour branch (eq. 3-5): a 3D CNN per stream, each giving N_a behaviour logits.
        for name, channels in (("rgb", 3), ("motion", 2)):
            if cfg.uses(name):
                self.behaviour[name] = Behaviour3D(
                    channels,
                    cfg.behaviour_layers,
                    cfg.behaviours,
                    stem_stride=cfg.behaviour_stem_stride,
                    pool=cfg.behaviour_pool,
                    fc=cfg.behaviour_fc,
                    dropout=cfg.branch_dropout,
                )
                if cfg.behaviours != C:
                    # Behaviour classes are not the video classes: the auxiliary loss goes through a map.
                    self.aux_heads[name] = nn.Linear(cfg.behaviours, C)

        # Scene branch (eq. 1-2) and the per-frame local features for NetVLAD and attention.
        if cfg.uses("frames"):
            self.scene.extend(self._vgg(name, cfg.num_scenes) for name in cfg.scene_nets)
            self._load_scene_weights(self.scene)
            self.frame_proj = nn.Linear(len(cfg.scene_nets) * cfg.scene_fc, cfg.frame_dim)
            self.frame_vlad = NetVLAD(cfg.frame_dim, cfg.frame_clusters, cfg.ghost_clusters)
            if cfg.attention_heads:
                self.attention = AttentionPool(cfg.frame_dim, cfg.attention_heads)

        # Audio windows and title tokens, each into its own NetVLAD (eq. 7-9, "backward fusion").
        if cfg.uses("audio"):
            self.audio_proj = nn.Sequential(
                nn.Linear(AUDIO_BINS, cfg.audio_dim), nn.LayerNorm(cfg.audio_dim), nn.ReLU(inplace=False)
            )
            self.audio_vlad = NetVLAD(cfg.audio_dim, cfg.audio_clusters, cfg.ghost_clusters)
        if cfg.uses("text"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.text_dim, padding_idx=0)
            self.text_vlad = NetVLAD(cfg.text_dim, cfg.text_clusters, cfg.ghost_clusters)

        # Classifier: each part layer-normalised (a NetVLAD descriptor has unit norm, probabilities sum to
        # one: without it the parts' scales differ by orders of magnitude), concatenated, dropout, linear.
        for name, dim in self.feature_dims().items():
            self.norms[name] = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(sum(self.feature_dims().values()), C)

    def _vgg(self, name: str, num_classes: int) -> VGG:
        cfg = self.config
        return VGG(
            name,
            num_classes,
            width=cfg.scene_width,
            pool=cfg.scene_pool,
            hidden=cfg.scene_fc,
            batch_norm=cfg.scene_batch_norm,
            dropout=cfg.branch_dropout,
        )

    def _load_scene_weights(self, nets) -> None:
        for net, path in zip(nets, self.config.scene_weights or (), strict=False):
            if path is not None:
                net.load_weights(path)

    def class_heads(self) -> list[str]:
        """The state_dict prefixes of the layers whose outputs are the video classes: the classifier, the
        behaviour heads' last layers when they give the classes (num_behaviours None) or the maps from
        behaviours to classes. Fine-tuning on other classes starts them afresh."""
        if self.frame2d is not None:
            return [f"frame2d.classifier.{len(self.frame2d.classifier) - 1}."]
        heads = ["classifier.", "aux_heads."]
        if self.config.num_behaviours is None:
            heads += [f"behaviour.{name}.head.{len(net.head) - 1}." for name, net in self.behaviour.items()]
        return heads

    def feature_dims(self) -> dict[str, int]:
        """The parts of the classifier's input and their sizes, in order."""
        cfg = self.config
        dims = {}
        if self.behaviour and cfg.uses("frames"):
            dims["joint"] = cfg.behaviours * cfg.num_scenes
        elif self.behaviour:
            dims["behaviour"] = cfg.behaviours
        elif cfg.uses("frames"):
            dims["scene"] = cfg.num_scenes
        if cfg.uses("frames"):
            dims["frames_vlad"] = cfg.frame_clusters * cfg.frame_dim
            if cfg.attention_heads:
                dims["attention"] = cfg.attention_heads * cfg.frame_dim
        if cfg.uses("audio"):
            dims["audio_vlad"] = cfg.audio_clusters * cfg.audio_dim
        if cfg.uses("text"):
            dims["text_vlad"] = cfg.text_clusters * cfg.text_dim
        return dims

    # -----------------------------------------------------------------------------------------------
    # forward

    def forward(self, batch: dict, return_features: bool = False) -> dict:
        B = self._batch_size(batch)
        if self.frame2d is not None:
            return self._forward_frame2d(batch, B, return_features)
        cfg = self.config
        parts: dict[str, Tensor] = {}

        # Behaviour (eq. 3-5): f_A = p_rgb + p_motion over the streams present.
        f_a, aux = self._behaviour(batch, B)  # (B, N_a)
        # Scene (eq. 1-2): f_s, and the per-frame features with their mask.
        if cfg.uses("frames"):
            f_s, x_f, frame_mask = self._scene(batch, B)  # (B, N_s), (B, F, D_f), (B, F)

        # Joint feature (eq. 6): the outer product f_A^T f_s, flattened.
        if f_a is not None and cfg.uses("frames"):
            parts["joint"] = (f_a.unsqueeze(2) * f_s.unsqueeze(1)).flatten(1)  # (B, N_a * N_s)
        elif f_a is not None:
            parts["behaviour"] = f_a
        elif cfg.uses("frames"):
            parts["scene"] = f_s

        # Clusters (eq. 7-9) and attention (eq. 10-13) over the frames.
        attention = None
        if cfg.uses("frames"):
            parts["frames_vlad"] = self.frame_vlad(x_f, frame_mask)  # (B, K_f * D_f)
            if self.attention is not None:
                # (B, H, D_f) and the key frames' weights (B, F, H)
                pooled, attention = self.attention(x_f, frame_mask, return_weights=True)
                parts["attention"] = pooled.flatten(1)  # (B, H * D_f)
        if cfg.uses("audio"):
            x_a, audio_mask = self._audio(batch, B)  # (B, A, D_a), (B, A)
            parts["audio_vlad"] = self.audio_vlad(x_a, audio_mask)  # (B, K_a * D_a)
        if cfg.uses("text"):
            x_t, text_mask = self._text(batch, B)  # (B, W, D_t), (B, W)
            parts["text_vlad"] = self.text_vlad(x_t, text_mask)  # (B, K_t * D_t)

        # Classifier.
        h = torch.cat([self.norms[name](parts[name]) for name in self.norms], dim=1)  # (B, sum of dims)
        logits = self.classifier(self.dropout(h))  # (B, C)
        out = {"logits": logits, "aux_logits": aux, "attention": attention}
        if return_features:
            features = {"embedding": h}
            if f_a is not None:
                features["behaviour"] = f_a
            if cfg.uses("frames"):
                features["scene"] = f_s
            features.update(parts)
            if attention is not None:
                features["attention_weights"] = attention
            out["features"] = features
        return out

    def _behaviour(self, batch: dict, B: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        if not self.behaviour:
            return None, {}
        f_a = self._zeros(B, self.config.behaviours)  # a stream missing from the batch adds nothing
        aux = {}
        for name, net in self.behaviour.items():
            if name in batch:
                logits = net(self._layout(batch[name]))  # (B, N_a)
                f_a = f_a + logits.softmax(dim=1)
                aux[name] = self.aux_heads[name](logits) if name in self.aux_heads else logits
        return f_a, aux

    def _scene(self, batch: dict, B: int) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        frames = batch.get("frames")
        if frames is None:
            F_ = cfg.scene_frames
            mask = torch.zeros(B, F_, dtype=torch.bool, device=self._device())
            return self._zeros(B, cfg.num_scenes), self._zeros(B, F_, cfg.frame_dim), mask
        F_ = frames.shape[1]
        flat = self._layout(frames.flatten(0, 1))  # (B * F, 3, h, w)
        feats, probs = [], 0.0
        for net in self.scene:
            h, scene_logits = net(flat)  # (B * F, hidden), (B * F, N_s)
            feats.append(h)
            probs = probs + scene_logits.softmax(dim=1)
        probs = (probs / len(self.scene)).view(B, F_, cfg.num_scenes)  # (B, F, N_s): VGG16 and VGG19 fused
        f_s = probs.mean(dim=1)  # (B, N_s): every scene's probability kept (eq. 2)
        x_f = self.frame_proj(torch.cat(feats, dim=1)).view(B, F_, cfg.frame_dim)  # (B, F, D_f)
        mask = torch.ones(B, F_, dtype=torch.bool, device=frames.device)
        return f_s, x_f, mask

    def _audio(self, batch: dict, B: int) -> tuple[Tensor, Tensor]:
        audio = batch.get("audio")
        if audio is None:
            mask = torch.zeros(B, 1, dtype=torch.bool, device=self._device())
            return self._zeros(B, 1, self.config.audio_dim), mask
        mask = self._mask(batch, "audio_mask", "has_audio", audio.shape[:2], audio.device)
        # Zeroed before the projection so that even inf/NaN padding cannot reach the output through 0 * x.
        audio = audio.masked_fill(~mask.unsqueeze(2), 0.0)  # (B, A, 64)
        return self.audio_proj(audio), mask  # (B, A, D_a)

    def _text(self, batch: dict, B: int) -> tuple[Tensor, Tensor]:
        text = batch.get("text")
        if text is None:
            mask = torch.zeros(B, 1, dtype=torch.bool, device=self._device())
            return self._zeros(B, 1, self.config.text_dim), mask
        mask = self._mask(batch, "text_mask", "has_text", text.shape, text.device)
        ids = text.masked_fill(~mask, 0)  # (B, W): padding ids, whatever the masked values were
        return self.embed(ids), mask  # (B, W, D_t)

    def _forward_frame2d(self, batch: dict, B: int, return_features: bool = False) -> dict:
        frames = batch.get("frames")
        if frames is None:
            logits = self._zeros(B, self.config.num_classes)
            h = self._zeros(B, self.frame2d.hidden)
        else:
            F_ = frames.shape[1]
            # (B * F, hidden), (B * F, C)
            feats, frame_logits = self.frame2d(self._layout(frames.flatten(0, 1)))
            logits = frame_logits.view(B, F_, -1).mean(dim=1)  # (B, C): averaged over the frames
            h = feats.view(B, F_, -1).mean(dim=1)  # (B, hidden)
        out = {"logits": logits, "aux_logits": {}, "attention": None}
        if return_features:
            out["features"] = {"embedding": h}
        return out

    # -----------------------------------------------------------------------------------------------
    # helpers

    def _batch_size(self, batch: dict) -> int:
        for key in ("rgb", "motion", "frames", "audio", "text", "label"):
            value = batch.get(key)
            if isinstance(value, Tensor):
                return value.shape[0]
        raise ValueError(
            "MicroVideoNet: the batch holds none of rgb, motion, frames, audio, text, label; "
            "cannot tell its size"
        )

    def _layout(self, x: Tensor) -> Tensor:
        """x in the memory layout the CNN branches run in (config.channels_last)."""
        if not self.config.channels_last:
            return x
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)

    def _device(self) -> torch.device:
        return (
            self.classifier.weight.device
            if self.frame2d is None
            else self.frame2d.classifier[0].weight.device
        )

    def _zeros(self, *shape: int) -> Tensor:
        ref = self.classifier.weight if self.frame2d is None else self.frame2d.classifier[0].weight
        return torch.zeros(shape, dtype=ref.dtype, device=ref.device)

    @staticmethod
    def _mask(batch: dict, mask_key: str, has_key: str, shape, device) -> Tensor:
        mask = batch.get(mask_key)
        mask = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
        has = batch.get(has_key)
        if has is not None:
            mask = mask & has.bool().unsqueeze(1)
        return mask

    # -----------------------------------------------------------------------------------------------
    # loss

    def loss(self, out: dict, labels: Tensor) -> Tensor:
        """The loss of ``out["logits"]`` plus ``config.aux_weight`` times the sum of the losses of
        ``out["aux_logits"]`` (the behaviour heads), all against the video labels: cross-entropy against
        class indices (Tensor[B]), or with ``config.multi_label`` binary cross-entropy with logits against
        multi-hot labels (Tensor[B, C]); ``config.label_smoothing`` and ``config.class_weights`` apply to
        each."""
        loss = self._loss(out["logits"], labels)
        aux = out.get("aux_logits") or {}
        if aux and self.config.aux_weight:
            loss = loss + self.config.aux_weight * sum(self._loss(a, labels) for a in aux.values())
        return loss

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        cfg = self.config
        weight = None
        if cfg.class_weights is not None:
            weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=logits.device)
        if not cfg.multi_label:
            return F.cross_entropy(logits, labels, weight=weight, label_smoothing=cfg.label_smoothing)
        target = labels.to(logits.dtype)
        if cfg.label_smoothing:
            target = target * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"architecture={cfg.architecture!r}, num_classes={cfg.num_classes}, modalities={cfg.modalities}"
        )


def create_model(name: str, num_classes: int, **overrides) -> MicroVideoNet:
    """The model of preset ``name`` ("tiny", "paper", "frame2d"; see :data:`mvfast.models.PRESETS`) for
    ``num_classes`` classes, with any field of :class:`MicroVideoConfig` overridden.

    Its Conv3d and (with ``scene_batch_norm``) Conv2d blocks are fused by ``mvfast.fuse`` (same outputs, same
    state_dict).

    >>> model = create_model("tiny", 10, modalities=("rgb", "motion"), dropout=0.25)
    >>> model.config.inputs()  # InputSpec(modalities=('rgb', 'motion'), clip_len=8, size=64, ...)

    Raises ValueError for an unknown preset (listing them) or an unknown field (naming it).
    """
    model = MicroVideoNet(preset_config(name, num_classes, **overrides))
    fuse(model, channels_last=False)  # the layout is the config's (channels_last), set at the branches' input
    return model
