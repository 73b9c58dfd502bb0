"""The learned-optimizer base: meta-parameters θ, a functional update, the frozen ``torch.optim`` face, checkpoints.

A :class:`LearnedOptimizer` is an ``nn.Module`` whose parameters are the meta-parameters θ, plus a pure, differentiable
update used by meta-training (and working under ``torch.func.vmap``)::

    state = lopt.init(params)                                   # params: dict[str, Tensor]
    new_params, state = lopt.step(params, grads, state)         # the protocol of every metaopt rule (metaopt.core)

Subclasses implement ``update(grads, state, params, lr) -> (updates, state)``, the additive form (``step`` adds the
updates to the parameters), and declare what their step needs beyond gradients (``needs_oracles``, ``static_step``).

:meth:`LearnedOptimizer.frozen` wraps it as an ordinary ``torch.optim.Optimizer`` (no graph, state in ``opt.state``,
exact ``state_dict`` resume), so evaluation never cares whether an optimizer was learned. For coordinatewise optimizers
that face steps through the flat-state fast path of :mod:`metaopt.learned.fast` by default (bit for bit the
functional update; ``compile=`` adds ``torch.compile``).

Checkpoints (``DESIGN.md``): a directory with ``config.json`` (class name, constructor arguments, metaopt version,
format version), ``model.safetensors`` (θ only — never a pickle) and a ``README.md`` model card. Loading rebuilds the
class from :data:`LEARNED_CLASSES` and checks every tensor's name and shape; pickles are refused unread.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from metaopt.core import CoreOptimizer, FunctionalOptimizer, all_finite, check_range
from metaopt.learned.cells import flatten, unflatten
from metaopt.learned.fast import FlatGroupState, compile_flat_step, flat_step
from metaopt.learned.fused import compile_with_fallback
from metaopt.version import __version__

Params = dict[str, Tensor]

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
GOLDEN_FILE = "golden.json"  # the final loss of a committed checkpoint's golden run (metaopt.cards)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Committed pretrained weights: <repo>/checkpoints/<name>/ (override with $METAOPT_CHECKPOINTS)

def _checkpoint_root() -> Path:
    """Where the shipped weights are: ``metaopt/checkpoints/`` of an installed wheel (package data, pyproject.toml),
    else the source tree's ``checkpoints/`` (a checkout or an editable install)."""
    installed = Path(__file__).resolve().parents[1] / "checkpoints"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "checkpoints"


CHECKPOINT_ROOT = _checkpoint_root()

LEARNED_CLASSES: dict[str, type["LearnedOptimizer"]] = {}  # class name -> class
LEARNED_NAMES: dict[str, type["LearnedOptimizer"]] = {}  # registry name ("hyperadam") -> class
# Every name make_optimizer / from_pretrained load from checkpoints/<name>: the class names above, and more pretrained
# checkpoints of those classes (register_pretrained: "hyperadam-general" is a HyperAdam meta-trained on another family)


def fingerprint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a checkpoint's weights in an evaluation's results: the SHA-256 of its ``model.safetensors``
    and, where it has one, the final loss of its golden run (``golden.json``). A result whose recorded weights differ
    from those now at its path evaluated weights since replaced (:func:`metaopt.evaluate.report.checkpoint_states`).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {directory} is not a checkpoint directory ({CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}, as save_pretrained writes them)")
    golden = directory / GOLDEN_FILE
    return {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "golden_loss": json.loads(golden.read_text())["final_loss"] if golden.is_file() else None}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong with it."""


def register_learned(name: str):
    """Class decorator: register a LearnedOptimizer under its registry ``name`` (and its class name)."""

    def decorate(cls: type[LearnedOptimizer]) -> type[LearnedOptimizer]:
        cls.registry_name = name
        LEARNED_CLASSES[cls.__name__] = cls
        LEARNED_NAMES[name] = cls
        return cls

    return decorate


def register_pretrained(name: str, cls: type["LearnedOptimizer"]) -> None:
    """Register ``name`` as one more pretrained checkpoint of the registered class ``cls``: ``make_optimizer(name,
    params)`` and ``from_pretrained(name)`` load ``checkpoints/<name>``. It is a name for weights, not a class:
    meta-training builds ``cls.registry_name`` (:func:`is_class_name`)."""
    if LEARNED_NAMES.get(getattr(cls, "registry_name", None)) is not cls:
        raise ValueError(f"{cls.__name__} is not a registered learned optimizer class (register_learned first)")
    if name in LEARNED_NAMES:
        raise ValueError(f"learned optimizer name {name!r} is already registered")
    LEARNED_NAMES[name] = cls


def is_class_name(name: str) -> bool:
    """Whether ``name`` names a learned optimizer class (one ``train_meta.py`` can build), not only a checkpoint."""
    return name in LEARNED_NAMES and LEARNED_NAMES[name].registry_name == name


class LearnedOptimizer(nn.Module, abc.ABC):
    """Base of every learned optimizer: ``nn.Module`` parameters are θ; ``init`` / ``update`` are pure.

    Subclasses set ``self.lr`` (the default step size α, saved in the config) and record their constructor arguments
    with :meth:`_store_config`.
    """

    registry_name: ClassVar[str] = ""
    lr: float

    def _store_config(self, **kwargs: Any) -> None:
        self._config = dict(kwargs)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this optimizer (saved in config.json)."""
        return dict(self._config)

    @abc.abstractmethod
    def init(self, params: Params) -> NamedTuple:
        """The optimizer state before the first step for the learner parameters ``params``."""

    @abc.abstractmethod
    def update(self, grads: Params, state: NamedTuple, params: Params,
               lr: float | Tensor | None = None) -> tuple[Params, NamedTuple]:
        """Updates (to add to ``params``) and the new state; differentiable w.r.t. θ. ``lr`` defaults to ``self.lr``.
        What a subclass implements; callers use :meth:`step`."""

    # -- the update protocol: what the inner loops, the unroll and the frozen face call ------------------------------

    #: Whether :meth:`step` also needs two oracles as keyword arguments: ``hvp=`` (H·v of the training loss for
    #: v = :meth:`hvp_vectors`) and ``val_grads=`` (the gradient of a validation loss), which the inner loops compute
    #: outside ``vmap`` (MARTHE's learned μ). Declared by the class; nothing probes for it.
    needs_oracles: ClassVar[bool] = False

    def step(self, params: Params, grads: Params, state: Any, lr: float | Tensor | None = None,
             **extra: Any) -> tuple[Params, Any]:
        """``(new_params, new_state)``: the update protocol that every metaopt rule shares
        (:meth:`metaopt.core.FunctionalOptimizer.step`, ``../shared/DESIGN.md``), out of place, differentiable w.r.t.
        θ and ``vmap``-safe. New parameters for the names in ``params`` (each needs a gradient): ``params + updates``
        of :meth:`update`, the sum the unroll and the frozen face have always formed. ``lr`` is the step size
        (default ``self.lr``); ``extra`` reaches :meth:`update`: ``step=`` (:meth:`static_step`) and the oracles
        (:attr:`needs_oracles`)."""
        updates, state = self.update(grads, state, params, lr=lr, **extra)
        return {n: p + updates[n] for n, p in params.items()}, state

    def static_step(self, state: Any) -> int | None:
        """The step count as a Python int where :meth:`update`'s arithmetic needs it (a hand-designed Adam's bias
        corrections inside a learned rule): a ``vmap``-ped call cannot read it from a per-instance tensor, so the
        vmapped inner loops group instances by it and pass ``step=count`` to :meth:`step`. ``None`` (the default):
        the arithmetic does not depend on it, no grouping, no ``step=``."""
        return None

    def hvp_vectors(self, state: Any) -> Params:
        """The vectors v of the ``hvp=`` oracle (H·v), per parameter name; only where :attr:`needs_oracles`."""
        raise TypeError(f"{type(self).__name__} takes no oracles (needs_oracles is False), so it has no hvp_vectors")

    # -- the frozen face ---------------------------------------------------------------------------------------------

    def frozen(self, params, lr: float | None = None, *, nonfinite: str = "skip", fast: bool = True,
               compile: bool | str = "auto", kernel: bool = False) -> torch.optim.Optimizer:
        """This optimizer with θ frozen, as a ``torch.optim.Optimizer`` over ``params`` (``fast``, ``compile`` and
        ``kernel``: see :class:`FrozenLearnedOptimizer`)."""
        return FrozenLearnedOptimizer(params, self, lr=lr, nonfinite=nonfinite, fast=fast, compile=compile,
                                      kernel=kernel)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str], card: str | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (and ``README.md`` when ``card`` is given) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"class": type(self).__name__, "name": self.registry_name, "config": self.config,
                  "metaopt_version": __version__, "format_version": FORMAT_VERSION}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        if card is not None:
            _atomic_write(directory / CARD_FILE, lambda p: p.write_text(card))
        return directory


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def checkpoint_root() -> Path:
    """Where registered names are looked up: ``$METAOPT_CHECKPOINTS``, else :data:`CHECKPOINT_ROOT`."""
    return Path(os.environ.get("METAOPT_CHECKPOINTS", CHECKPOINT_ROOT))


def resolve_checkpoint(name_or_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint directory for a registered name (``checkpoints/<name>``) or a path; refuses pickles."""
    path = Path(name_or_dir)
    if path.is_file() or path.suffix in PICKLE_SUFFIXES:
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path}: pickle-based checkpoints are refused (unpickling can run arbitrary code). metaopt loads a "
                f"directory holding {CONFIG_FILE} and {WEIGHTS_FILE}; convert the weights with safetensors.")
        raise CheckpointError(f"{path}: expected a checkpoint directory holding {CONFIG_FILE} and {WEIGHTS_FILE}, "
                              "got a file")
    if path.is_dir():
        return path
    if isinstance(name_or_dir, str) and name_or_dir in LEARNED_NAMES:
        directory = checkpoint_root() / name_or_dir
        if not directory.is_dir():
            raise CheckpointError(
                f"No pretrained checkpoint for {name_or_dir!r} at {directory}. Meta-train one with train_meta.py and "
                f"pass its directory, or pass a LearnedOptimizer instance (e.g. metaopt.learned."
                f"{LEARNED_NAMES[name_or_dir].__name__}()).")
        return directory
    known = ", ".join(LEARNED_NAMES)
    raise CheckpointError(f"{name_or_dir!r} is neither a checkpoint directory nor a learned optimizer name ({known})")


def from_pretrained(name_or_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LearnedOptimizer:
    """Load a learned optimizer: a registered name (from ``checkpoints/<name>``) or a checkpoint directory.

    Returns the module in eval mode with ``requires_grad`` off. Raises :class:`CheckpointError` naming the file for a
    missing or truncated file, an unknown class or format version, or weights whose names / shapes do not match the
    config; pickle files are never opened.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_checkpoint(name_or_dir)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    for path in (config_path, weights_path):
        if not path.is_file():
            extra = f" (found {pickles}: pickle files are refused, never loaded)" if pickles else ""
            raise CheckpointError(f"{path}: missing{extra}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not {"class", "config", "format_version"} <= set(config):
        raise CheckpointError(f"{config_path}: expected keys 'class', 'config', 'format_version'")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {config['format_version']!r} is not supported "
                              f"(this metaopt reads version {FORMAT_VERSION})")
    cls = LEARNED_CLASSES.get(config["class"])
    if cls is None:
        raise CheckpointError(f"{config_path}: unknown class {config['class']!r} "
                              f"(known: {', '.join(LEARNED_CLASSES)})")
    try:
        lopt = cls(**config["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: cannot build {config['class']} from its config ({err})") from None
    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: unreadable or truncated safetensors file ({err})") from None
    expected = lopt.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: tensors do not match {config_path} "
                              f"(missing: {missing}, unexpected: {unexpected})")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise CheckpointError(f"{weights_path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, but "
                                  f"{config_path} builds {tuple(value.shape)}")
    lopt.load_state_dict(tensors)
    return lopt.to(map_location).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Coordinatewise optimizers: one recurrent cell shared by every coordinate of every tensor


class CoordinatewiseOptimizer(LearnedOptimizer):
    """A learned optimizer applying the same cell to every coordinate (HyperAdam, DMoptimizer, RNNprop).

    Subclasses implement :meth:`init_flat` and :meth:`step_flat` on the flat vector of all coordinates; the state is
    a NamedTuple of per-coordinate tensors of shape (n, k). :meth:`init` / :meth:`update` turn dicts of tensors into
    that flat vector and back, so the cell runs once per step whatever the number of tensors, and normalizations
    over "the whole gradient" cover every tensor passed in one call.
    """

    @abc.abstractmethod
    def init_flat(self, n: int, like: Tensor) -> NamedTuple:
        """State for ``n`` coordinates, each field of shape (n, k), dtype/device of ``like``."""

    @abc.abstractmethod
    def step_flat(self, grad: Tensor, state: NamedTuple) -> tuple[Tensor, NamedTuple]:
        """The update direction d (n,) for the flat gradient ``grad`` (n,), and the new state (w ← w − α d)."""

    #: The fused Triton kernel of :mod:`metaopt.learned.kernels` that steps this class (``kernel=True``), if any.
    kernel_name: ClassVar[str | None] = None

    def kernel_width(self) -> int:
        """The width the kernel's tiles cover (HyperAdam's candidates, an LSTM's hidden units); ``ValueError`` where
        no kernel implements this class or configuration."""
        raise ValueError(f"kernel=True: no Triton kernel for {type(self).__name__} (HyperAdam, DMoptimizer and RNNprop "
                         "have one)")

    #: True when :meth:`step_flat` is purely coordinatewise (no reduction over the coordinates), so that it takes
    #: leading batch dimensions as they are: :meth:`fused_step` then is ``step_flat`` itself on all instances at once.
    batch_agnostic: ClassVar[bool] = False

    @property
    def has_fused_step(self) -> bool:
        """Whether :meth:`fused_step` exists for this configuration (meta-training then uses it by default)."""
        return self.batch_agnostic

    def fused_step(self, grad: Tensor, state: tuple[Tensor, ...],
                   compiled: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
        """:meth:`step_flat` for a batch of instances at once: ``grad`` (..., n), state fields (..., n, k) in the
        order of the state NamedTuple; equal to :meth:`step_flat` per instance within float rounding, meta-gradients
        too. HyperAdam overrides it with a cell whose backward is written by hand and keeps only its inputs
        (:mod:`metaopt.learned.fused`); a :attr:`batch_agnostic` optimizer runs ``step_flat`` on the batch, its
        backward by autograd, and with ``compiled`` through ``torch.compile`` (forward and backward fused by
        inductor; eager fallback with a warning when compilation fails)."""
        if not self.batch_agnostic:
            raise TypeError(f"{type(self).__name__} with this configuration has no fused step (has_fused_step is "
                            "False)")
        step = _compiled_step_flat(self) if compiled else self.step_flat
        direction, new_state = step(grad, _state_type(self, grad)(*state))
        return direction, tuple(new_state)

    def init(self, params: Params) -> NamedTuple:
        names = list(params)
        n = sum(p.numel() for p in params.values())
        like = next(iter(params.values()))
        flat = self.init_flat(n, like)
        return type(flat)(*(unflatten(f, params, names) for f in flat))

    def update(self, grads: Params, state: NamedTuple, params: Params,
               lr: float | Tensor | None = None) -> tuple[Params, NamedTuple]:
        names = list(grads)
        flat_state = type(state)(*(flatten(f, names, trailing=1) for f in state))
        direction, flat_state = self.step_flat(flatten(grads, names), flat_state)
        alpha = self.lr if lr is None else lr
        updates = unflatten(-alpha * direction, grads, names)
        return updates, type(state)(*(unflatten(f, grads, names) for f in flat_state))


# compile="auto" (the frozen face's default): compile a param group's step on a CPU from this many coordinates on.
# Compiling costs ~20-40 s on the 2-core AMD EPYC (a few with inductor's disk cache warm) and then saves ~1.3 µs per
# coordinate and step (HyperAdam, MLP 784-256-256-256-10: 745 ms eager, 305 ms compiled, 2026-12-07 faces bench): from
# 100,000 coordinates on it pays for itself within a few hundred steps; a small model's would take thousands (15,910
# coordinates: 15.7 vs 8.5 ms). On CUDA "auto" stays eager: compiled steps there have not been timed yet.
AUTO = "auto"
AUTO_COMPILE_COORDINATES = 100_000

_COMPILED_STEPS: "weakref.WeakKeyDictionary[CoordinatewiseOptimizer, Any]" = weakref.WeakKeyDictionary()
_STATE_TYPES: dict[type, type] = {}


def _state_type(lopt: CoordinatewiseOptimizer, like: Tensor) -> type:
    """The NamedTuple type of ``lopt``'s state (from an empty state, once per class)."""
    cls = type(lopt)
    if cls not in _STATE_TYPES:
        _STATE_TYPES[cls] = type(lopt.init_flat(0, like))
    return _STATE_TYPES[cls]


def _compiled_step_flat(lopt: CoordinatewiseOptimizer):
    """``torch.compile(lopt.step_flat)`` (one per module, kept outside it so that deep copies stay plain)."""
    if lopt not in _COMPILED_STEPS:
        _COMPILED_STEPS[lopt] = compile_with_fallback(torch.compile(lopt.step_flat, fullgraph=True, dynamic=None),
                                                      lopt.step_flat)
    return _COMPILED_STEPS[lopt]


# ----------------------------------------------------------------------------------------------------------------------
# The frozen torch.optim face


class _FrozenRule(FunctionalOptimizer):
    """A learned optimizer with its step size bound: the face's rule (``LearnedOptimizer.step`` at ``lr``)."""

    def __init__(self, lopt: LearnedOptimizer, lr: float):
        self.lopt, self.lr = lopt, lr

    def init(self, params: Params) -> NamedTuple:
        return self.lopt.init(params)

    def step(self, params: Params, grads: Params, state: NamedTuple) -> tuple[Params, NamedTuple]:
        return self.lopt.step(params, grads, state, lr=self.lr)


def _kernels() -> Any:
    """:mod:`metaopt.learned.kernels`, imported where ``kernel=True`` is used: it loads Triton (a third of a second),
    which nothing else needs, so ``import metaopt`` does not (DESIGN.md: heavy optional dependencies load when used)."""
    import metaopt.learned.kernels as kernels

    return kernels


class FrozenLearnedOptimizer(CoreOptimizer):
    """A learned optimizer with frozen θ as a ``torch.optim.Optimizer``.

    Runs under ``no_grad`` and builds no graph; the recurrent state and moments live in ``opt.state`` (one entry per
    parameter, shaped like it plus the state width) and resume exactly through ``state_dict()``; ``lr`` is the step
    size α (default: the checkpoint's), so LR schedulers work; param groups are normalized separately (each group is
    one call of the cell). Non-finite gradients skip the step (``nonfinite="skip"``, counted) or raise.

    Args:
        params, lopt, lr, nonfinite: the parameters, the learned optimizer, its step size α (default ``lopt.lr``) and
            the non-finite policy (:class:`~metaopt.core.CoreOptimizer`).
        fast: for a :class:`CoordinatewiseOptimizer` (default True), keep each param group's state as one flat
            (n, k) buffer per field, with ``opt.state[p][field]`` views into it, and step it with one call of the cell
            and one ``torch._foreach_add_`` (:mod:`metaopt.learned.fast`). Bit for bit the reference path (``False``:
            the functional ``update`` on dicts, which concatenates and splits the state every step), with the same
            ``state_dict()``; either path resumes from the other's. Other learned optimizers always take the
            reference path. One difference to know: the state is updated in place, as ``torch.optim.Adam``'s is, so a
            ``state_dict()`` kept across steps must be deep-copied to stay a snapshot.
        compile: ``True`` runs the fast step through ``torch.compile(dynamic=False, fullgraph=True)``; a string picks
            the compile mode (``"reduce-overhead"``: CUDA graphs). Needs ``fast`` and a coordinatewise optimizer.
            Compiles on the first step of each param group, and again only when its number of coordinates, dtype or
            device changes (``lr`` is a tensor input); equal to the reference within float32 rounding (fused kernels
            reorder reductions), not bit for bit. The faces of one learned optimizer share its compiled step.
            ``"auto"`` (the default) compiles a param group on a CPU from :data:`AUTO_COMPILE_COORDINATES`
            coordinates on and steps smaller groups, and every group on CUDA, eagerly (bit for bit the reference);
            it never raises, and on a machine where compiling fails it warns once and runs eagerly. ``False``: never.
        kernel: ``True`` runs the fast step as one fused Triton kernel per param group (:mod:`metaopt.learned.kernels`:
            each state field read and written once; CUDA, float32, the configurations listed there, checked here).
            Equal to the reference within float32 rounding. Excludes ``compile``.
    """

    def __init__(self, params, lopt: LearnedOptimizer, lr: float | None = None, *, nonfinite: str = "skip",
                 fast: bool = True, compile: bool | str = "auto", kernel: bool = False):
        lr = lopt.lr if lr is None else lr
        check_range("learning rate", lr)
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"Invalid compile: {compile!r} (expected True, False, 'auto' or a torch.compile mode)")
        coordinatewise = isinstance(lopt, CoordinatewiseOptimizer)
        if compile == AUTO and (kernel or not (fast and coordinatewise)):
            compile = False  # the default: nothing to compile on these paths
        if compile is not False and not (fast and coordinatewise):
            raise ValueError(f"Invalid compile: {compile!r} (compiling needs fast=True and a coordinatewise learned "
                             f"optimizer; {type(lopt).__name__} with fast={fast!r})")
        if kernel and (compile is not False or not (fast and coordinatewise)):
            raise ValueError(f"Invalid kernel: True needs fast=True, compile=False and a coordinatewise learned "
                             f"optimizer ({type(lopt).__name__} with fast={fast!r}, compile={compile!r})")
        self.lopt = lopt.eval().requires_grad_(False)
        self.fast = bool(fast) and coordinatewise
        self.compile, self.kernel = compile, bool(kernel)
        if self.kernel:
            self._flat_step = _kernels().kernel_step
        else:
            self._flat_step = compile_flat_step(True if compile == AUTO else compile, self.lopt) \
                if compile is not False else flat_step
        self._flat_groups: dict[int, FlatGroupState] = {}  # id(param group) -> its flat state
        super().__init__(params, dict(lr=lr), nonfinite=nonfinite)
        if self.kernel:
            for group in self.param_groups:
                for p in group["params"]:
                    _kernels().check_supported(self.lopt, p.device, p.dtype)

    def rule(self, group: dict[str, Any]) -> FunctionalOptimizer:
        self._lopt_on(group["params"][0].device)
        return _FrozenRule(self.lopt, group["lr"])

    def _lopt_on(self, device: torch.device) -> None:
        theta = next(self.lopt.parameters(), None)
        if theta is not None and theta.device != device:
            self.lopt.to(device)

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        """Apply the rule to one group (``grads`` defaults to ``p.grad``); False if the step was skipped.
        With ``fast``, the flat path of :mod:`metaopt.learned.fast`; otherwise the reference path."""
        if not self.fast:
            return super().step_group(group, grads)
        params = group["params"]
        if grads is None:
            live = [p for p in params if p.grad is not None]
            live_grads = [p.grad for p in live]
        else:
            names, _ = self.named_params(group)
            live = [p for n, p in zip(names, params) if n in grads]
            live_grads = [grads[n] for n, p in zip(names, params) if n in grads]
        if not live:
            return False
        for p, g in zip(live, live_grads):
            if g.is_sparse:
                name = next(n for n, q in zip(*self.named_params(group)) if q is p)
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name!r})")
        flat_state = self._flat_groups.get(id(group))
        current = flat_state is not None and flat_state.matches(live, self.state)
        parts = [g.reshape(-1) for g in live_grads]
        grad = torch.cat(parts, out=flat_state.grad) if current else torch.cat(parts)
        # One reduction and one host sync for the whole group, before anything is written (the reference checks
        # every tensor and syncs once too).
        if not all_finite([grad]):
            return self.skip_nonfinite(group, "gradient (NaN or inf)")
        self._lopt_on(grad.device)
        if not current:
            flat_state = self._rebuild(group, live, grad, flat_state)
        lr = group["lr"]
        compiled = flat_state.compiled
        neg_lr = flat_state.neg_lr_tensor(lr) if compiled else -lr
        step = self._flat_step if compiled or self.kernel else flat_step
        step(self.lopt, flat_state.state_type, flat_state.grad, neg_lr, flat_state.update, *flat_state.fields)
        torch._foreach_add_(flat_state.params, flat_state.update_views)
        return True

    def _rebuild(self, group: dict[str, Any], live: list[Tensor], grad: Tensor,
                 old: FlatGroupState | None) -> FlatGroupState:
        """New flat buffers for the group's parameters with a gradient, from ``self.state`` (the source of truth)."""
        if self.kernel:  # also covers groups added after construction
            _kernels().check_supported(self.lopt, grad.device, grad.dtype)
        names, params = self.named_params(group)
        live_ids = {id(p) for p in live}
        live_names = [n for n, p in zip(names, params) if id(p) in live_ids]
        flat_state = FlatGroupState.build(self.lopt, self.state, live_names, live, grad)
        if old is not None:
            old.release(self.state, keep=live)
        flat_state.compiled = self._compiles(grad)
        if flat_state.compiled:
            flat_state.mark_static()
        self._flat_groups[id(group)] = flat_state
        return flat_state

    def _compiles(self, grad: Tensor) -> bool:
        """Whether the group whose flat gradient is ``grad`` steps through the compiled step: always with ``compile``
        True or a mode, never with False or a kernel, and with ``"auto"`` on a CPU from AUTO_COMPILE_COORDINATES on."""
        if self.compile == AUTO:
            return grad.device.type == "cpu" and grad.numel() >= AUTO_COMPILE_COORDINATES
        return self.compile is not False and not self.kernel

    @property
    def compiled(self) -> bool:
        """Whether any param group has stepped through the compiled step (``compile``, resolved per group)."""
        return any(state.compiled for state in self._flat_groups.values())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The loaded per-parameter state replaces the views: the flat buffers are rebuilt from it on the next step.
        self._flat_groups.clear()
        super().load_state_dict(state_dict)
