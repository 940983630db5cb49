"""Positive and negative LoRA adapters, routed per batch row.

Each target ``nn.Linear`` is wrapped in a peft LoRA layer holding two adapters, ``pos`` and ``neg``. A forward
pre-hook hands every call peft's ``adapter_names`` (one name per row), so a single batched call runs the positive
adapter on positive-branch rows and the negative one on negative-branch rows. Rows that nobody routed run the
base weights only. Detaching puts the original module objects back, so the model's state dict is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .files import LoraLayer
from .model import BRANCHES, AdapterSite

BASE = "__base__"  # peft's name for "no adapter on this row"


@dataclass(frozen=True)
class AdapterSpec:
    """Rank and alpha of one branch's adapter on one part of the model (rank 0 = no adapter)."""

    rank: int
    alpha: float


class AdapterError(ValueError):
    pass


def _parent_and_attr(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


class BranchAdapters:
    """LoRA adapters for the positive and negative branch on the parts of one model.

    ``specs[part][branch]`` gives the rank/alpha; ``layer_ranks`` (optional) overrides the rank per module path
    when loading adapters whose modules differ (composed concepts). Use as a context manager or call
    :meth:`attach` / :meth:`detach`.
    """

    def __init__(
        self,
        sites: Sequence[AdapterSite],
        specs: Mapping[str, Mapping[str, AdapterSpec]],
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        # plan[part][module path][branch] = spec: which adapters each wrapped module gets
        plan: dict[str, dict[str, dict[str, AdapterSpec]]] = {}
        for site in sites:
            branches = {b: s for b, s in specs.get(site.part, {}).items() if s.rank > 0}
            if branches:
                plan[site.part] = {path: dict(branches) for path in site.module_paths}
        self._init(sites, plan, generator)

    @classmethod
    def from_layers(
        cls, sites: Sequence[AdapterSite], layers: Mapping[str, Mapping[str, LoraLayer]], *, source: str = "adapters"
    ) -> "BranchAdapters":
        """Adapters shaped after saved weights (``layers[branch][kohya prefix]``), attached and loaded."""
        path_of = {site.kohya_prefix(path): (site.part, path) for site in sites for path in site.module_paths}
        plan: dict[str, dict[str, dict[str, AdapterSpec]]] = {}
        for branch, branch_layers in layers.items():
            for prefix, w in branch_layers.items():
                if prefix not in path_of:
                    raise AdapterError(f"{source}: layer {prefix} does not match this model")
                part, path = path_of[prefix]
                plan.setdefault(part, {}).setdefault(path, {})[branch] = AdapterSpec(w.down.shape[0], w.alpha)
        adapters = cls.__new__(cls)
        adapters._init(sites, plan, None)
        adapters._fresh_weights = False  # every weight is loaded below: skip drawing initial values
        adapters.attach()
        try:
            for branch, branch_layers in layers.items():
                adapters.load(branch, branch_layers, source=source)
        except BaseException:
            adapters.detach()
            raise
        return adapters

    def _init(self, sites, plan, generator) -> None:
        self.sites = {s.part: s for s in sites if s.part in plan}
        self._plan = plan
        self._generator = generator
        self._layers: dict[str, dict[str, LoraLinear]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: dict[str, list[str] | None] = {part: None for part in self.sites}
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._fresh_weights = True

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._layers)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.sites)

    def attach(self) -> "BranchAdapters":
        if self.attached:
            raise RuntimeError("adapters are already attached")
        self._saved_flags = [(p, p.requires_grad) for s in self.sites.values() for p in s.root.parameters()]
        try:
            for part, site in self.sites.items():
                layers = self._layers.setdefault(part, {})  # filled one by one: detach() must see partial work
                for path, specs in self._plan[part].items():
                    layers[path] = self._wrap(site, part, path, specs)
        except BaseException:
            self.detach()
            raise
        return self

    def _wrap(self, site: AdapterSite, part: str, path: str, specs: Mapping[str, AdapterSpec]) -> LoraLinear:
        parent, attr = _parent_and_attr(site.root, path)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"{part} module {path} is a {type(base).__name__}, not a Linear layer")
        layer: LoraLinear | None = None
        for branch in BRANCHES:
            spec = specs.get(branch)
            if spec is None:
                continue
            if layer is None:
                layer = LoraLinear(base, branch, r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=False)
            else:
                layer.update_layer(branch, spec.rank, spec.alpha, 0.0, init_lora_weights=False, use_rslora=False)
            if self._fresh_weights:
                self._initialise(layer, branch)
        assert layer is not None
        layer.set_adapter([b for b in BRANCHES if b in layer.lora_A])
        # peft stores adapters in the base weight's dtype; optimiser state and updates need float32.
        for branch in layer.lora_A:
            layer.lora_A[branch].float()
            layer.lora_B[branch].float()
        hook = self._route_hook(part, sequence_first=site.is_sequence_first(path))
        self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        setattr(parent, attr, layer)
        return layer

    def _initialise(self, layer: LoraLinear, branch: str) -> None:
        # Same distribution as peft's default (kaiming-uniform A, zero B) but drawn from our generator, so a seed
        # reproduces a run exactly.
        weight = layer.lora_A[branch].weight
        bound = 1.0 / math.sqrt(weight.shape[1])
        values = torch.rand(weight.shape, generator=self._generator, dtype=torch.float32) * 2 * bound - bound
        with torch.no_grad():
            weight.copy_(values.to(weight.device, weight.dtype))
            layer.lora_B[branch].weight.zero_()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for part, layers in self._layers.items():
            root = self.sites[part].root
            for path, layer in layers.items():
                parent, attr = _parent_and_attr(root, path)
                if getattr(parent, attr) is layer:
                    setattr(parent, attr, layer.get_base_layer())
        self._layers.clear()
        for param, flag in self._saved_flags:
            param.requires_grad_(flag)
        self._saved_flags.clear()
        self._rows = {part: None for part in self.sites}

    def __enter__(self) -> "BranchAdapters":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- routing ------------------------------------------------------------------------------------------------

    def _route_hook(self, part: str, *, sequence_first: bool = False):
        def hook(module, args, kwargs):
            rows = self._rows[part]
            batch = args[0].shape[1 if sequence_first else 0]
            if rows is None:
                rows = [BASE] * batch
            elif len(rows) != batch:
                raise RuntimeError(f"{part} adapter routed for {len(rows)} rows but called with {batch}")
            if sequence_first:
                # peft splits a mixed batch along dim 0, here the sequence: only one branch per call can be right
                if len(set(rows)) > 1:
                    raise RuntimeError(f"{part} adapters on a sequence-first layer need one branch per call")
                rows = rows[:1] * args[0].shape[0]
            kwargs["adapter_names"] = rows
            return args, kwargs

        return hook

    def set_rows(self, part: str, branches: Sequence[str] | None) -> None:
        """Route the next calls of ``part``: row i uses the adapter of ``branches[i]`` (None = base weights)."""
        if part not in self._rows:
            return
        if branches is None:
            self._rows[part] = None
            return
        unknown = set(branches) - set(BRANCHES) - {BASE}
        if unknown:
            raise ValueError(f"unknown branch {sorted(unknown)}; expected {BRANCHES}")
        self._rows[part] = list(branches)

    def routing_state(self) -> dict[str, list[str] | None]:
        """The current routing of every part (gradient checkpointing replays a block with it)."""
        return {part: (list(rows) if rows is not None else None) for part, rows in self._rows.items()}

    @contextlib.contextmanager
    def restored_routing(self, state: Mapping[str, list[str] | None]) -> Iterator[None]:
        previous = self._rows
        self._rows = {part: state.get(part) for part in previous}
        try:
            yield
        finally:
            self._rows = previous

    @contextlib.contextmanager
    def routed(self, part: str, branches: Sequence[str] | None) -> Iterator[None]:
        previous = self._rows.get(part)
        self.set_rows(part, branches)
        try:
            yield
        finally:
            if part in self._rows:
                self._rows[part] = previous

    # -- parameters and weights ---------------------------------------------------------------------------------

    def parameters(self, branch: str, part: str | None = None) -> list[nn.Parameter]:
        params = []
        for p, layers in self._layers.items():
            if part is not None and p != part:
                continue
            for layer in layers.values():
                if branch in layer.lora_A:
                    params += [layer.lora_A[branch].weight, layer.lora_B[branch].weight]
        return params

    def export(self, branch: str) -> dict[str, LoraLayer]:
        """The branch's weights keyed by kohya prefix (what the host's Lora loader and our files use)."""
        out = {}
        for part, layers in self._layers.items():
            prefix_of = self.sites[part].kohya_prefix
            for path, layer in layers.items():
                if branch not in layer.lora_A:
                    continue
                out[prefix_of(path)] = LoraLayer(
                    down=layer.lora_A[branch].weight.detach().float().cpu().clone(),
                    up=layer.lora_B[branch].weight.detach().float().cpu().clone(),
                    alpha=float(layer.lora_alpha[branch]),
                )
        return out

    def load(self, branch: str, layers: Mapping[str, LoraLayer], *, source: str = "adapter file") -> None:
        """Copy weights (keyed by kohya prefix) into the attached branch; every key must find its module."""
        by_prefix = {}
        for part, mods in self._layers.items():
            prefix_of = self.sites[part].kohya_prefix
            for path, layer in mods.items():
                by_prefix[prefix_of(path)] = layer
        unknown = sorted(set(layers) - set(by_prefix))
        if unknown:
            raise AdapterError(f"{source}: {len(unknown)} layer(s) do not match this model, e.g. {unknown[0]}")
        for prefix, weights in layers.items():
            layer = by_prefix[prefix]
            if branch not in layer.lora_A:
                raise AdapterError(f"{source}: {prefix} has no {branch} adapter slot")
            a, b = layer.lora_A[branch].weight, layer.lora_B[branch].weight
            if tuple(weights.down.shape) != tuple(a.shape) or tuple(weights.up.shape) != tuple(b.shape):
                raise AdapterError(
                    f"{source}: {prefix} has shapes {tuple(weights.down.shape)}/{tuple(weights.up.shape)}, "
                    f"this model needs {tuple(a.shape)}/{tuple(b.shape)}"
                )
            with torch.no_grad():
                a.copy_(weights.down.to(a.device, a.dtype))
                b.copy_(weights.up.to(b.device, b.dtype))
            layer.lora_alpha[branch] = weights.alpha
            layer.scaling[branch] = weights.alpha / layer.r[branch]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor under a stable key, for training checkpoints."""
        out = {}
        for branch in BRANCHES:
            for prefix, w in self.export(branch).items():
                out[f"{branch}.{prefix}.down"] = w.down
                out[f"{branch}.{prefix}.up"] = w.up
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for branch in BRANCHES:
            current = self.export(branch)
            layers = {}
            for prefix, w in current.items():
                try:
                    layers[prefix] = LoraLayer(tensors[f"{branch}.{prefix}.down"], tensors[f"{branch}.{prefix}.up"], w.alpha)
                except KeyError as missing:
                    raise AdapterError(f"checkpoint lacks adapter tensor {missing}") from None
            self.load(branch, layers, source="checkpoint")


def compose_layers(weighted: Sequence[tuple[Mapping[str, LoraLayer], float]]) -> dict[str, LoraLayer]:
    """Sum several LoRA deltas into one layer per module by stacking their ranks.

    ``sum_i w_i * (alpha_i / r_i) * up_i @ down_i`` equals ``up @ down`` with ``up = [w_i (alpha_i/r_i) up_i]``,
    ``down = [down_i]`` and ``alpha = r``, so composing concepts is exact and needs one adapter per branch.
    """
    stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for layers, weight in weighted:
        for prefix, w in layers.items():
            rank = w.down.shape[0]
            downs, ups = stacked.setdefault(prefix, ([], []))
            downs.append(w.down.float())
            ups.append(w.up.float() * (weight * w.alpha / rank))
    out = {}
    for prefix, (downs, ups) in stacked.items():
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        out[prefix] = LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
    return out
