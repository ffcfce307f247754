"""``mvfast.fuse(model)`` and ``mvfast.unfuse(model)``: swap every Conv3d -> BatchNorm3d (-> ReLU) chain of a
model for a :class:`~mvfast.nn.Conv3dBNReLU`, and every Conv2d -> BatchNorm2d (-> ReLU) chain for a
:class:`~mvfast.nn.Conv2dBNReLU`, in place, and back. 2D and 3D chains follow the same rules below.

Which chains are found:
- in an nn.Sequential (or a subclass that keeps Sequential's forward): consecutive children conv, bn,
  relu. A Sequential that is exactly the chain (torchvision's ``conv1 = Sequential(Conv3DSimple, BN,
  ReLU)``, ``BasicStem``) is replaced whole by the fused block, whose state_dict keys are the
  Sequential's. A chain inside a longer Sequential (torchvision's ``Conv2Plus1D``, VGG's ``features``) is
  fused in place: the block takes the conv's slot and the BatchNorm's and ReLU's slots become nn.Identity.
- in any other module: chains of direct children applied in that order in forward, found by tracing
  that module's forward one level deep with torch.fx (each child a leaf): the conv's only user is the
  BatchNorm and the BatchNorm's only user the ReLU, each called once. A module whose forward fx cannot
  trace (data-dependent control flow) is searched no further at that level; its children still are.
- a conv -> BatchNorm pair with no ReLU after it (torchvision's ``conv2 = Sequential(Conv3DSimple, BN)``
  before the residual add, and the ``downsample`` branches) is fused too, with ``relu=False``: in eval its
  BN folds into the conv, in training it saves one activation fewer. A ReLU module that is also called
  elsewhere is left in place and the pair fused without it (torchvision's 2D ``BasicBlock`` and
  ``Bottleneck`` call one ``self.relu`` module for every ReLU of the block, the one after the residual
  add included, so all their pairs fuse with ``relu=False``).

The state_dict of the fused model has the original keys: for a chain fused in place, the parent module
gets a state_dict hook and a load pre-hook that rename the block's ``conv.0.*`` / ``conv.1.*`` keys to
``conv.*`` / ``bn.*`` and back, so checkpoints load either way. ``unfuse`` removes them and gives back the
original modules (the same objects, holding the current parameters and statistics).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch.fx
from torch import nn

from mvfast.nn._conv_bn_relu import ConvBNReLU
from mvfast.nn.conv2d_bn_relu import Conv2dBNReLU
from mvfast.nn.conv3d_bn_relu import Conv3dBNReLU

_KEYMAP = "_mvfast_fused_slots"  # on a parent: {conv slot: bn slot} of the chains fused in place
_HANDLES = "_mvfast_fuse_hooks"
_BLOCKS = (Conv3dBNReLU, Conv2dBNReLU)
_CONVS = tuple(b.conv_type for b in _BLOCKS)


def fuse(model: nn.Module, channels_last: bool | str = "auto") -> tuple[nn.Module, int]:
    """Replaces, in place, each Conv3d -> BatchNorm3d -> ReLU chain (and each Conv3d -> BatchNorm3d pair)
    of ``model`` by a Conv3dBNReLU, and each Conv2d -> BatchNorm2d (-> ReLU) one by a Conv2dBNReLU, over
    the same parameters and buffers. Returns ``(model, blocks fused)``.

    Outputs in eval, and losses, gradients and running-statistics updates in training, are those of the
    original model; state_dict keys are unchanged. Fusing an already fused model fuses nothing more (its
    blocks' ``channels_last`` is set as asked).

    channels_last: the memory layout the fused blocks run in. With True every fused block converts its
    input to channels-last (channels_last_3d, or channels_last for 2D blocks) and so outputs channels-last:
    an NCDHW model then runs channels-last from its first block on (the first converts once; residual
    adds, pooling and the next blocks keep the layout), with no conversion of the activations per block
    but a small one for the wide layers below. ``"auto"`` (the default) does that for CPU tensors in
    float32 or bfloat16 (oneDNN's fast layout, the one the CPU kernels convolve in but for wide layers
    whose weights outweigh their input, which take a small NCDHW copy of it), and keeps the
    input's layout elsewhere (CUDA tensors, float64, float16). False keeps the input's layout in every
    block: each block's output is in its input's memory format, as the unfused chain's is. Values are the
    same in all three; only the layout of the activations (and of the gradients reaching the input) is
    not, so code that takes feature maps out of a fused model and calls ``.view`` on them may need
    ``.reshape`` (or ``channels_last=False``). In training a block that converts its input saves the input
    itself where it is dense, not the copy, as a block keeping the layout does; under ``torch.func.vmap``
    nothing is converted.
    """
    if channels_last not in (True, False, "auto") or not isinstance(channels_last, (bool, str)):
        raise ValueError(f"fuse: channels_last must be True, False or 'auto', got {channels_last!r}")
    count = _fuse_in(model)
    for m in model.modules():
        if isinstance(m, ConvBNReLU):
            m.channels_last = channels_last
    return model, count


def unfuse(model: nn.Module) -> tuple[nn.Module, int]:
    """Undoes :func:`fuse` in place (any Conv3dBNReLU or Conv2dBNReLU created by the user becomes
    nn.Sequential(conv, bn, ReLU), the same state_dict). Returns ``(model, blocks unfused)``."""
    return model, _unfuse_in(model)


# ---------------------------------------------------------------------------------------------------
# fuse


def _block_type(conv: nn.Module, bn: nn.Module) -> type[ConvBNReLU] | None:
    """The fused block that can run conv then bn, or None."""
    for cls in _BLOCKS:
        if cls.fusable(conv, bn):
            return cls
    return None


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _exact_chain(seq: nn.Module) -> bool | None:
    """For a Sequential that is exactly [conv, bn] or [conv, bn, ReLU]: ends in ReLU? (None: no chain)."""
    if not _is_plain_sequential(seq) or seq._forward_hooks or seq._forward_pre_hooks:
        return None
    mods = list(seq._modules.values())
    if len(mods) in (2, 3) and _block_type(mods[0], mods[1]):
        if len(mods) == 2:
            return False
        if type(mods[2]) is nn.ReLU:
            return True
    return None


def _fuse_in(parent: nn.Module) -> int:
    if isinstance(parent, ConvBNReLU):
        return 0
    count = 0
    # Children first: whole-Sequential chains are swapped from their parent.
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        relu = _exact_chain(child)
        if relu is not None:
            mods = list(child._modules.values())
            block = _block_type(mods[0], mods[1]).from_modules(mods[0], mods[1], relu=relu)
            block._mvfast_origin = ("sequential", child)  # given back by unfuse, with its current children
            parent._modules[name] = block
            count += 1
        else:
            count += _fuse_in(child)
    chains = _sequential_chains(parent) if _is_plain_sequential(parent) else _traced_chains(parent)
    for conv_name, bn_name, relu_name in chains:
        _fuse_slots(parent, conv_name, bn_name, relu_name)
        count += 1
    return count


def _sequential_chains(seq: nn.Sequential) -> list[tuple[str, str, str | None]]:
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]
    chains, i = [], 0
    while i + 1 < len(mods):
        if _block_type(mods[i], mods[i + 1]):
            relu = i + 2 < len(mods) and type(mods[i + 2]) is nn.ReLU
            chains.append((names[i], names[i + 1], names[i + 2] if relu else None))
            i += 3 if relu else 2
        else:
            i += 1
    return chains


class _OneLevelTracer(torch.fx.Tracer):
    """Traces a module's own forward, every child a leaf: only the order of the children's calls matters."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _traced_chains(parent: nn.Module) -> list[tuple[str, str, str | None]]:
    children = {n: m for n, m in parent._modules.items() if m is not None}
    if not any(isinstance(m, _CONVS) for m in children.values()):
        return []
    try:
        graph = _OneLevelTracer().trace(parent)
    except Exception:  # noqa: BLE001 - any forward fx cannot trace: this level is left as it is
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr" and node.target.split(".")[0] in children:
            calls[node.target.split(".")[0]] = 2  # a child's parameters used directly: leave it alone

    def single_call(node, cls=None):
        return (
            node.op == "call_module"
            and node.target in children
            and calls[node.target] == 1
            and (cls is None or type(children[node.target]) is cls)
        )

    chains = []
    for node in graph.nodes:
        if not single_call(node) or not isinstance(children[node.target], _CONVS) or len(node.users) != 1:
            continue
        (bn_node,) = node.users
        if not (
            single_call(bn_node)
            and bn_node.args == (node,)
            and not bn_node.kwargs
            and _block_type(children[node.target], children[bn_node.target])
        ):
            continue
        relu_name = None
        if len(bn_node.users) == 1:
            (relu_node,) = bn_node.users
            if single_call(relu_node, nn.ReLU) and relu_node.args == (bn_node,) and not relu_node.kwargs:
                relu_name = relu_node.target
        chains.append((node.target, bn_node.target, relu_name))
    return chains


def _fuse_slots(parent: nn.Module, conv_name: str, bn_name: str, relu_name: str | None) -> None:
    conv, bn = parent._modules[conv_name], parent._modules[bn_name]
    block = _block_type(conv, bn).from_modules(conv, bn, relu=relu_name is not None)
    relu = parent._modules[relu_name] if relu_name is not None else None
    block._mvfast_origin = ("slots", bn_name, relu_name, relu)
    parent._modules[conv_name] = block
    parent._modules[bn_name] = nn.Identity()
    if relu_name is not None:
        parent._modules[relu_name] = nn.Identity()
    slots = parent.__dict__.setdefault(_KEYMAP, {})
    slots[conv_name] = bn_name
    if _HANDLES not in parent.__dict__:
        parent.__dict__[_HANDLES] = _key_hooks(parent)


def _key_hooks(parent: nn.Module) -> tuple:
    """The state-dict hooks that keep the original keys: Module's public hooks (torch 2.5+), else the
    private forms torch 2.4 has, which call the same hooks with the same arguments."""
    if hasattr(parent, "register_state_dict_post_hook"):
        return (
            parent.register_state_dict_post_hook(_save_original_keys),
            parent.register_load_state_dict_pre_hook(_load_original_keys),
        )
    return (
        parent._register_state_dict_hook(_save_original_keys),
        parent._register_load_state_dict_pre_hook(_load_original_keys, with_module=True),
    )


# State dict key mapping for chains fused in place: the block at slot `c` holds the conv as `c.0` and the
# BatchNorm as `c.1`; the original model had them at `c` and `b`.


def _renamed(key: str, prefix: str, slots: dict[str, str], to_original: bool) -> str:
    for conv_name, bn_name in slots.items():
        if to_original:
            pairs = (
                (f"{prefix}{conv_name}.0", f"{prefix}{conv_name}"),
                (f"{prefix}{conv_name}.1", f"{prefix}{bn_name}"),
            )
        else:
            pairs = (
                (f"{prefix}{conv_name}", f"{prefix}{conv_name}.0"),
                (f"{prefix}{bn_name}", f"{prefix}{conv_name}.1"),
            )
        for old, new in pairs:
            if key == old or key.startswith(old + "."):
                if not to_original and (
                    key.startswith(f"{prefix}{conv_name}.0.") or key.startswith(f"{prefix}{conv_name}.1.")
                ):
                    return key  # already in the fused layout
                return new + key[len(old) :]
    return key


def _rename_all(state_dict, prefix: str, slots: dict[str, str], to_original: bool) -> None:
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        state_dict[_renamed(k, prefix, slots, to_original)] = v
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in list(meta):
            new = _renamed(k, prefix, slots, to_original)
            if new != k:
                meta[new] = meta.pop(k)


_FUSED_KEYS = contextvars.ContextVar("mvfast_fused_state_dict_keys", default=False)


@contextlib.contextmanager
def fused_state_dict_keys() -> Iterator[None]:
    """Within this block a fused model's ``state_dict()`` has the keys of its fused layout (``c.0.weight``
    for the conv of the block at slot ``c``), those of ``named_parameters()``, not the original model's.
    mvfast.export exports inside it: torch.export of torch 2.4 and 2.5 looked each parameter up in
    ``state_dict()`` by its ``named_parameters()`` name ("Parameter ... is not in the state dict")."""
    token = _FUSED_KEYS.set(True)
    try:
        yield
    finally:
        _FUSED_KEYS.reset(token)


def _save_original_keys(module, state_dict, prefix, local_metadata) -> None:
    slots = module.__dict__.get(_KEYMAP)
    if slots and not _FUSED_KEYS.get():
        _rename_all(state_dict, prefix, slots, to_original=True)


def _load_original_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    slots = module.__dict__.get(_KEYMAP)
    if slots:
        _rename_all(state_dict, prefix, slots, to_original=False)


# ---------------------------------------------------------------------------------------------------
# unfuse


def _unfuse_in(parent: nn.Module) -> int:
    count = 0
    for name, child in list(parent._modules.items()):
        if isinstance(child, ConvBNReLU):
            origin = getattr(child, "_mvfast_origin", None)
            if origin is None:
                mods = [child.conv, child.bn] + ([nn.ReLU()] if child.relu else [])
                parent._modules[name] = nn.Sequential(*mods)
            elif origin[0] == "sequential":
                seq = origin[1]
                keys = list(seq._modules)
                seq._modules[keys[0]], seq._modules[keys[1]] = child.conv, child.bn
                parent._modules[name] = seq
            else:
                _, bn_name, relu_name, relu = origin
                parent._modules[name] = child.conv
                parent._modules[bn_name] = child.bn
                if relu_name is not None:
                    parent._modules[relu_name] = relu
                slots = parent.__dict__.get(_KEYMAP, {})
                slots.pop(name, None)
                if not slots and _HANDLES in parent.__dict__:
                    for h in parent.__dict__.pop(_HANDLES):
                        h.remove()
                    parent.__dict__.pop(_KEYMAP, None)
            count += 1
        elif child is not None:
            count += _unfuse_in(child)
    return count
