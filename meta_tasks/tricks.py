"""The training tricks of Lv, Jiang & Li (2017), as reusable wrappers around any :class:`~meta_tasks.base.Task`.

*Random Scaling* (RS): a per-coordinate scale c = exp(U(−r, r)) is drawn once per task instance; the learner's
parameters start at w₀ / c and the loss is L(c ⊙ w). An optimizer that only sees gradients must therefore cope with
coordinates of very different curvature, which is what keeps a learned optimizer from over-fitting one scale.

*Combination with Convex function* (CC): extra coordinates z are appended and the loss becomes
L(w) + h(z), h(z) = (1/k)‖z − η‖² (HyperAdam eq. 9), with η and z₀ drawn per instance. The official HyperAdam code uses
k = 20. HyperAdam's recipe applies RS with r = 3 to the learner and r = 1 to the convex term::

    L(c₁ ⊙ w) + h(c₂ ⊙ z)      ==   hyperadam_tricks(task, generator)

Both wrappers hold their random draws as tensors per instance, compose with each other, and are themselves Tasks.
The draws are: c ~ exp(U(−r, r)) per coordinate; for CC, ``style="official"`` (what the authors' code does,
``../shared/specs/hyperadam-official.md``): η ~ U(−1, 1), z₀ = 0 and h(z) = mean(clip((z − η)², 0, 10)), so that the
term starts below 1/3 on average and its gradient vanishes for coordinates that stray far; ``style="gaussian"`` (this
module's earlier reading of the paper's "generated randomly"): η ~ N(0, 1), z₀ ~ N(0, 1), h unclipped — about 6x
larger at the start (measured on the hyperadam-paper instances), where it pulls a learned optimizer away from the
learner's own loss. :class:`GaussianInit` replaces a task's initialization by N(0, σ²) for every parameter, biases
included (the authors' learner initialization, σ = 0.1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from meta_tasks.base import Batch, Params, Task

CONVEX_KEY = "convex.z"


class TaskWrapper(Task):
    """A Task delegating to ``inner``; subclasses change parameters and loss."""

    def __init__(self, inner: Task):
        self.inner = inner
        self.name = inner.name
        self.depth = inner.depth + 1 if isinstance(inner, TaskWrapper) else 1  # names this wrapper's draws

    def loss(self, params: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        return self.loss_with(params, batch, self.draws(), buffers)

    def base(self) -> Task:
        return self.inner.base()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def param_shapes(self) -> dict[str, torch.Size]:
        return self.inner.param_shapes()

    def init_buffers(self) -> Params:
        return self.inner.init_buffers()

    def sample_batch(self, generator: torch.Generator, split: str = "train", batch_size: int | None = None) -> Batch:
        return self.inner.sample_batch(generator, split, batch_size)

    def unwrap(self) -> Task:
        """The plain task underneath every wrapper."""
        return self.base()


class RandomScaling(TaskWrapper):
    """Random Scaling (Lv et al. 2017): loss L(c ⊙ w), initialization w₀ / c, with c = exp(U(−r, r)) per coordinate.

    Args:
        inner: the task to wrap.
        r: the scale range (HyperAdam: 3 for the learner, 1 for the convex term). r = 0 gives c ≡ 1.
        generator: draws c, once, at construction (one draw per task instance).
        keys: the parameters to scale (default: all of ``inner``'s).
    """

    def __init__(self, inner: Task, r: float, generator: torch.Generator, keys: Iterable[str] | None = None):
        super().__init__(inner)
        if r < 0:
            raise ValueError(f"Invalid Random Scaling range r: {r} (expected >= 0)")
        shapes = inner.param_shapes()
        keys = list(shapes) if keys is None else list(keys)
        unknown = [k for k in keys if k not in shapes]
        if unknown:
            raise ValueError(f"RandomScaling: unknown parameter(s) {unknown}; the task has {list(shapes)}")
        self.r = r
        self.scales: dict[str, Tensor] = {}
        for k in keys:
            u = torch.rand(shapes[k], generator=generator, device=generator.device)
            self.scales[k] = torch.exp((2 * u - 1) * r).to(inner.device)

    def _key(self, name: str) -> str:
        return f"rs{self.depth}.{name}"

    def draws(self) -> Params:
        return {**self.inner.draws(), **{self._key(n): c for n, c in self.scales.items()}}

    def scale(self, params: Params, draws: Params | None = None) -> Params:
        """The inner task's parameters c ⊙ w (c from ``draws`` when given, else this instance's)."""
        draws = self.draws() if draws is None else draws
        return {n: (p * draws[self._key(n)] if n in self.scales else p) for n, p in params.items()}

    def init(self, generator: torch.Generator) -> Params:
        return {n: (p / self.scales[n] if n in self.scales else p) for n, p in self.inner.init(generator).items()}

    def loss_with(self, params: Params, batch: Batch, draws: Params, buffers: Params | None = None) -> Tensor:
        return self.inner.loss_with(self.scale(params, draws), batch, draws, buffers)

    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        return self.inner.evaluate(self.scale(params), split, buffers)


CONVEX_STYLES = ("official", "gaussian")
CONVEX_CLIP = 10.0  # the official code's clip of each squared residual


class ConvexCombination(TaskWrapper):
    """Combination with a Convex function (Lv et al. 2017; HyperAdam eq. 9): loss L(w) + h(z).

    Adds the parameter ``"convex.z"`` of k coordinates. η is drawn at construction (per task instance), z₀ by
    :meth:`init`. :meth:`evaluate` reports the inner task's metrics on w alone. ``style`` (module docstring):
    ``"official"`` h(z) = mean(clip((z − η)², 0, 10)), η ~ U(−1, 1), z₀ = 0; ``"gaussian"`` h(z) = (1/k)‖z − η‖²,
    η, z₀ ~ N(0, 1).
    """

    def __init__(self, inner: Task, k: int, generator: torch.Generator, style: str = "gaussian"):
        super().__init__(inner)
        if k < 1:
            raise ValueError(f"Invalid convex dimension k: {k} (expected >= 1)")
        if style not in CONVEX_STYLES:
            raise ValueError(f"Invalid convex style: {style!r} (expected one of {CONVEX_STYLES})")
        if CONVEX_KEY in inner.param_shapes():
            raise ValueError("ConvexCombination is already applied to this task")
        self.k, self.style = k, style
        if style == "official":
            eta = 2 * torch.rand(k, generator=generator, device=generator.device) - 1
        else:
            eta = torch.randn(k, generator=generator, device=generator.device)
        self.eta = eta.to(inner.device)

    def param_shapes(self) -> dict[str, torch.Size]:
        return {**self.inner.param_shapes(), CONVEX_KEY: torch.Size([self.k])}

    def init(self, generator: torch.Generator) -> Params:
        params = self.inner.init(generator)
        if self.style == "official":
            z0 = torch.zeros(self.k, device=self.device)
        else:
            z0 = torch.randn(self.k, generator=generator, device=generator.device).to(self.device)
        return {**params, CONVEX_KEY: z0}

    def draws(self) -> Params:
        return {**self.inner.draws(), f"cc{self.depth}.eta": self.eta}

    def convex_term(self, z: Tensor, eta: Tensor | None = None) -> Tensor:
        """h(z) of the style (η: this instance's unless given)."""
        diff = z - (self.eta if eta is None else eta)
        squares = diff * diff
        if self.style == "official":
            squares = squares.clamp(max=CONVEX_CLIP)
        return squares.sum() / self.k

    def loss_with(self, params: Params, batch: Batch, draws: Params, buffers: Params | None = None) -> Tensor:
        inner_params = {n: p for n, p in params.items() if n != CONVEX_KEY}
        eta = draws[f"cc{self.depth}.eta"]
        return self.inner.loss_with(inner_params, batch, draws, buffers) + self.convex_term(params[CONVEX_KEY], eta)

    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        return self.inner.evaluate({n: p for n, p in params.items() if n != CONVEX_KEY}, split, buffers)


class GaussianInit(TaskWrapper):
    """``inner`` with every parameter initialized N(0, ``std``²), biases included (HyperAdam's official learner
    initialization: σ = 0.1); the loss and everything else are the inner task's."""

    def __init__(self, inner: Task, std: float):
        super().__init__(inner)
        if not std > 0:
            raise ValueError(f"Invalid init std: {std} (expected > 0)")
        self.std = std

    def draws(self) -> Params:
        return self.inner.draws()

    def init(self, generator: torch.Generator) -> Params:
        return {n: (torch.randn(shape, generator=generator, device=generator.device) * self.std).to(self.device)
                for n, shape in self.inner.param_shapes().items()}

    def loss_with(self, params: Params, batch: Batch, draws: Params, buffers: Params | None = None) -> Tensor:
        return self.inner.loss_with(params, batch, draws, buffers)

    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        return self.inner.evaluate(params, split, buffers)


def hyperadam_tricks(task: Task, generator: torch.Generator, rs_learner: float = 3.0, rs_convex: float = 1.0,
                     convex_k: int = 20, convex_style: str = "gaussian", init_std: float = 0.0) -> Task:
    """HyperAdam's meta-training optimizee L(c₁ ⊙ w) + h(c₂ ⊙ z): RS on the learner (r = 3), CC with k = 20 in
    ``convex_style``, and RS on the convex term (r = 1). A zero range or ``convex_k=0`` switches that trick off (the
    paper's ablation); ``init_std > 0`` first makes the learner's initialization N(0, init_std²) (:class:`GaussianInit`)."""
    if init_std > 0:
        task = GaussianInit(task, init_std)
    if rs_learner > 0:
        task = RandomScaling(task, rs_learner, generator)
    if convex_k > 0:
        task = ConvexCombination(task, convex_k, generator, convex_style)
        if rs_convex > 0:
            task = RandomScaling(task, rs_convex, generator, keys=[CONVEX_KEY])
    return task
