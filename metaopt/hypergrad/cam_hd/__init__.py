"""CAM-HD: combined adaptive multi-level hypergradient descent (``specs/hypergradient.md`` §6; paper
``papers/cam-hd-long.txt``, Algorithm 1 and eqs. 31–38; Jie et al., arXiv 2008.07277 / IJMLC 2022).

No public implementation of CAM-HD exists; this package is the reference one. One module per concern, each importing
only those listed before it:

- :mod:`.validation` — the level names and defaults, and the checks of ``levels``, γ, the per-level β and the
  choice-valued options, shared by the rule and the faces;
- :mod:`.layout` — :class:`ParamLayout`, the level groupings of one parameter set (parameter / unit / layer / global),
  computed once as segment ids so that every level's hypergradient is an O(n) segment sum (``index_add``), with no
  Python loop over units;
- :mod:`.gamma` — :func:`update_gamma`, the combination-weight step in ``renorm`` or ``softmax`` mode (step 5);
- :mod:`.maths` — one step's maths as functions: :func:`level_hypergradients`, ``h^{(k)}`` for every level from
  ``g_t ⊙ d_{t−1}`` (spec §6(b) step 2); :func:`combine_levels`, ``α*[p] = Σ_k γ_k·α^{(k)}[π_k(p)]`` (step 4); the decay
  factor and the updates with a float or tensor rate;
- :mod:`.rule` — the functional, differentiable rule :class:`CamHDRule` (SGD, SGD with Nesterov/heavy-ball momentum,
  Adam bases) and its states, whose ``step`` accepts a per-step tensor ``γ`` (the hook a learned-γ rule uses);
- :mod:`.compiled` — the step as two functions for ``torch.compile`` (the faces' ``compile=True``);
- :mod:`.face` — the ``torch.optim`` faces :class:`CamHDSGD`, :class:`CamHDSGDN`, :class:`CamHDAdam`, registered as
  ``cam-hd-sgd``, ``cam-hd-sgdn`` and ``cam-hd-adam`` (importing this package registers them).

Every public name of these modules but the compiled step's is importable from ``metaopt.hypergrad.cam_hd``.

Conventions (spec §1): steps t = 1, 2, …; ``g_t = ∇f_t(θ_{t−1})`` includes coupled L2 weight decay; ``d_t`` is the base
optimizer's direction and ``θ_t = θ_{t−1} − κ_t ⊙ d_t``; ``h`` is the TRUE hypergradient ``∂f_t/∂α_{t−1}`` (the paper's
Alg. 1 has the opposite sign, A-C1), so with ``d_0 = 0`` every level has ``α_1 = α_0``.

Decisions where the paper and spec leave room (each also noted where it is implemented):

- Levels are an ordered subset of ``("parameter", "unit", "layer", "global")`` (fine to coarse; ``"param"`` and
  ``"filter"`` are accepted aliases). Layer = all parameters of one ``nn.Module`` (name prefix before the last ``.``);
  unit / filter = row / output channel j (dim 0) of a tensor together with ``bias[j]`` of the same module (A-C8).
- Per-level β (A-C4): sum-reduced ``h`` and a common β by default (the exact chain-rule derivatives, which makes C-1
  exact); ``beta_reduction="mean"`` (β per group = β/|G|) and ``"paper_eq35"`` (β per group = |G|·β, eq. 35 read
  literally; replication only).
- ``∂L/∂γ_k`` always uses the true, sum-reduced ``h^{(k)}`` (τ-scaled) and the pre-update ``α^{(k)}_{t−1}`` (A-C2,
  A-C7), whatever ``beta_reduction`` is.
- ``τ(t) = exp(−s·t)`` scales the hypergradients by ``τ_{t−1}`` (chain rule through κ, A-C9); ``α_∞ = lr`` by default.
- The group-level state (γ, ``∂L/∂γ``, the unit / layer / global rates) is float64, like HD's Python-float α, and the
  per-tensor sums behind the layer and global hypergradients are the float64 dot products of
  :func:`metaopt.hypergrad.hd.global_hypergradient`; so the global level is Adam-HD / SGD-HD bit for bit (C-1).
"""

from metaopt.hypergrad.cam_hd.face import CamHD, CamHDAdam, CamHDSGD, CamHDSGDN
from metaopt.hypergrad.cam_hd.gamma import GAMMA_MODES, update_gamma
from metaopt.hypergrad.cam_hd.layout import HYPER_DTYPE, ParamLayout, module_prefix
from metaopt.hypergrad.cam_hd.maths import (
    coarse_hypergradients,
    combine_levels,
    decay_factor,
    level_hypergradients,
    rate_dtype,
)
from metaopt.hypergrad.cam_hd.rule import (
    CamHDAdamState,
    CamHDHypergradients,
    CamHDRates,
    CamHDRule,
    CamHDSGDState,
    CamHDState,
    level_rates,
)
from metaopt.hypergrad.cam_hd.validation import (
    BASES,
    BETA_REDUCTIONS,
    DEFAULT_GAMMA,
    DEFAULT_GAMMA_2_LEVEL,
    DEFAULT_LEVELS,
    LEVEL_ALIASES,
    LEVELS,
    Scalar,
    check_gamma,
    default_gamma,
    parse_levels,
)

__all__ = ["BASES", "BETA_REDUCTIONS", "DEFAULT_GAMMA", "DEFAULT_GAMMA_2_LEVEL", "DEFAULT_LEVELS", "GAMMA_MODES",
           "HYPER_DTYPE", "LEVELS", "LEVEL_ALIASES", "CamHD", "CamHDAdam", "CamHDAdamState", "CamHDHypergradients",
           "CamHDRates", "CamHDRule", "CamHDSGD", "CamHDSGDN", "CamHDSGDState", "CamHDState", "ParamLayout", "Scalar",
           "check_gamma", "coarse_hypergradients", "combine_levels", "decay_factor", "default_gamma",
           "level_hypergradients", "level_rates", "module_prefix", "parse_levels", "rate_dtype", "update_gamma"]
