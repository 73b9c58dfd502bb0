"""CAM-HD's level groupings: :class:`ParamLayout`, the parameter / unit / layer / global groups of one parameter set as
segment ids, and :func:`module_prefix`, the default layer key."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# The small per-level vectors (γ, the unit / layer / global rates) are float64 whatever the parameters' dtype.
HYPER_DTYPE = torch.float64


def module_prefix(name: str) -> str:
    """The default layer key (A-C8): the owning module's name, i.e. the parameter name before its last ``.``
    (``"features.0.weight"`` → ``"features.0"``; a top-level ``"weight"`` → ``""``, the root module)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _split_name(name: str) -> tuple[str, str]:
    return (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]) if "." in name else ("", name)


class ParamLayout:
    """The level groupings of one ordered parameter set, computed once (spec §6 "Levels", A-C8).

    - **layer**: all tensors with the same ``layer_key(name)`` (default :func:`module_prefix`: one ``nn.Module``,
      weight and bias together). Without names (``named=False``, e.g. ``model.parameters()``) each tensor is a layer.
    - **unit** (filter): row j along dim 0 of each tensor — output unit j of a ``Linear`` weight, output channel
      (filter) j of a ``Conv`` weight, channel j of a ``BatchNorm`` scale — together with element j of the module's
      matching 1-D bias (``<module>.bias`` ↔ ``<module>.weight``, more generally the leaf name with ``bias`` replaced
      by ``weight``: ``bias_ih_l0`` ↔ ``weight_ih_l0``) when its length equals the weight's dim 0. Any other 1-D tensor
      is on its own: each of its elements is a unit (it is its own set of output rows). A 0-d tensor is one unit.
      (``ConvTranspose`` weights keep their *input* channels on dim 0; pass such models' own groupings via a custom
      layout if filter-level rates on them matter.)
    - **global**: everything; **parameter**: every element.

    Every tensor covers a contiguous range of unit ids ``[unit_offset, unit_offset + unit_rows)`` (a matched bias
    shares its weight's range), so gathering a tensor's unit rates is a slice, and the unit / layer hypergradients are
    one ``index_add`` each over precomputed segment ids (:meth:`indices`). Groups are numbered in order of first
    appearance.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], *, named: bool = True,
                 layer_key: Callable[[str], str] | None = None):
        self.names = tuple(names)
        self.shapes = tuple(torch.Size(s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise ValueError("ParamLayout: one shape per name is required")
        if len(set(self.names)) != len(self.names):
            raise ValueError("ParamLayout: parameter names must be unique")
        self.position = {n: i for i, n in enumerate(self.names)}
        self.numels = tuple(s.numel() for s in self.shapes)
        self.numel = sum(self.numels)

        key = layer_key or module_prefix
        layer_ids: dict[Any, int] = {}
        self.layer_of = tuple(layer_ids.setdefault(key(n) if named else i, len(layer_ids))
                              for i, n in enumerate(self.names))
        self.layer_keys = tuple(layer_ids)
        self.num_layers = len(layer_ids)

        self.unit_rows = tuple(s[0] if len(s) else 1 for s in self.shapes)
        shares_with: dict[int, int] = {}  # bias position -> weight position
        if named:
            for i, n in enumerate(self.names):
                prefix, leaf = _split_name(n)
                if len(self.shapes[i]) != 1 or "bias" not in leaf:
                    continue
                weight = leaf.replace("bias", "weight")
                j = self.position.get(f"{prefix}.{weight}" if prefix else weight)
                if (j is not None and j != i and len(self.shapes[j]) >= 1 and self.shapes[j][0] == self.shapes[i][0]
                        and self.layer_of[j] == self.layer_of[i]):
                    shares_with[i] = j
        offsets, next_unit = [0] * len(self.names), 0
        for i in range(len(self.names)):
            if i not in shares_with:
                offsets[i], next_unit = next_unit, next_unit + self.unit_rows[i]
        for i, j in shares_with.items():
            offsets[i] = offsets[j]
        self.unit_offset = tuple(offsets)
        self.num_units = next_unit
        self.shared_bias = dict(shares_with)
        self._by_device: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor], *, named: bool = True,
                    layer_key: Callable[[str], str] | None = None) -> ParamLayout:
        """The layout of a dict of tensors, in its iteration order."""
        return cls(list(params), [p.shape for p in params.values()], named=named, layer_key=layer_key)

    def signature(self) -> tuple:
        return self.names, self.shapes

    def num_groups(self, level: str) -> int:
        return {"parameter": self.numel, "unit": self.num_units, "layer": self.num_layers, "global": 1}[level]

    def indices(self, device: torch.device | str | None) -> dict[str, Tensor]:
        """Segment ids and group sizes on ``device`` (built once per device):

        - ``unit_index``: for the concatenation of every tensor's per-row sums (in layout order), the unit id of each
          row (length ``Σ unit_rows``);
        - ``layer_index``: the layer id of each tensor (length = number of tensors);
        - ``unit_size`` / ``layer_size`` (float64): the number of elements in each unit / layer.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        cached = self._by_device.get(device)
        if cached is None:
            unit_index = torch.cat([torch.arange(o, o + r, dtype=torch.long) for o, r in
                                    zip(self.unit_offset, self.unit_rows)]) if self.names else \
                torch.zeros(0, dtype=torch.long)
            cols = torch.cat([torch.full((r,), float(n // r if r else 0), dtype=HYPER_DTYPE)
                              for n, r in zip(self.numels, self.unit_rows)]) if self.names else \
                torch.zeros(0, dtype=HYPER_DTYPE)
            layer_index = torch.tensor(self.layer_of, dtype=torch.long)
            unit_size = torch.zeros(self.num_units, dtype=HYPER_DTYPE).index_add(0, unit_index, cols)
            layer_size = torch.zeros(self.num_layers, dtype=HYPER_DTYPE).index_add(
                0, layer_index, torch.tensor(self.numels, dtype=HYPER_DTYPE))
            cached = {"unit_index": unit_index.to(device), "layer_index": layer_index.to(device),
                      "unit_size": unit_size.to(device), "layer_size": layer_size.to(device)}
            self._by_device[device] = cached
        return cached

    def group_sizes(self, level: str, device: torch.device | str | None) -> Tensor | float:
        """|G| for every group of ``level`` (1 for the parameter level, n for the global level)."""
        if level == "parameter":
            return 1.0
        if level == "global":
            return float(self.numel)
        return self.indices(device)[f"{level}_size"]

    def unit_view_shape(self, name: str) -> tuple[int, ...]:
        """The shape that broadcasts a tensor's unit rates (one per dim-0 row) over the tensor."""
        shape = self.shapes[self.position[name]]
        return (shape[0],) + (1,) * (len(shape) - 1) if len(shape) else ()

