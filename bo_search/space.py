"""Parameter spaces: load and validate the JSON, map space names to layer FQNs, and encode/decode
plans <-> parameter dicts. This is the ONLY module that builds parameter names.

The JSON is the original tool's format, accepted as is, plus optional keys::

    {
      "granularity": "block",            # or "linear", or [{"name": "qkv", "regex": "self_attn\\\\.[qkv]_proj"}, ...]
      "symmetric": false,                # symmetric codes (no zero point) instead of asymmetric
      "parameters": [
        {"name": "bitwidth", "name_format": "bitwidth.{i}.",
         "layers": [{"range": [0, 3], "type": "fixed", "value": 5},
                    {"range": [3, 32], "type": "choice", "values": [2, 3, 4, 5, 6, 8]}]},
        {"name": "groupsize", "name_format": "groupsize.{i}.",
         "layers": [{"range": [0, 32], "type": "choice", "values": [32, 64, 128, 256]}]}
      ]
    }

- ``range`` is end-exclusive over decoder block indices; the ranges of one parameter must cover
  every block exactly once.
- ``granularity`` says which linears of a block share one setting. ``"block"`` (default): all of
  them. ``"linear"``: one setting per linear. A list of ``{"name", "regex"}`` groups: the linears
  whose block-relative name (e.g. ``self_attn.q_proj``) fully matches ``regex`` share a setting
  (e.g. q/k/v for fused kernels); every linear must match exactly one group. With a granularity
  other than ``"block"`` the ``name_format`` must contain ``{group}``.
- A ``layers`` entry may carry ``"groups": ["mlp", ...]`` to apply only to those groups.
- bitwidth 16 leaves a layer unquantized; groupsize -1 means one group per output channel.
- Group sizes must divide every affected layer's ``in_features`` (ragged groups are rejected).

Over the ~400-line guide on purpose: parameter names are built (from ``name_format``) and parsed
(Ax encodings) here and nowhere else, the house rule that keeps plans from being found by slicing
strings; the validation of the JSON that builds them lives next to them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bo_search.model import ModelLayers
from bo_search.types import (
    GGML_TYPE_NAMES,
    PER_CHANNEL,
    LayerQuant,
    QuantPlan,
    UserError,
    ggml_check_type,
    ggml_effective_type,
    read_text_utf8,
)

BITS_NAMES = ("bitwidth", "bits")
GROUP_NAMES = ("groupsize", "group_size")
GGML_NAMES = ("ggml_type",)
SCHEMES = ("affine", "ggml")


@dataclass(frozen=True)
class SpaceParam:
    """One parameter of the space: a choice (or a fixed value) for one setting slot."""

    name: str  # e.g. "bitwidth.3." or "bitwidth.3.qkv"
    kind: str  # "bits" or "group_size"
    block: int
    group: str  # "" with block granularity
    values: tuple[int, ...]
    fixed: bool

    @property
    def is_tunable(self) -> bool:
        return not self.fixed and len(self.values) > 1


@dataclass(frozen=True)
class Slot:
    """Linears sharing one setting: a block (or a group of linears within a block)."""

    block: int
    group: str
    fqns: tuple[str, ...]
    bits: SpaceParam
    group_size: SpaceParam

    @property
    def choices(self) -> tuple[tuple[int, int], ...]:
        """Every (bits, group_size) value pair the slot allows, bits outer: the one place they are enumerated."""
        return tuple((b, g) for b in self.bits.values for g in self.group_size.values)


@dataclass(frozen=True)
class SearchSpace:
    """``scheme`` "affine": a slot's setting is (bits, group size). "ggml": it is a llama.cpp tensor
    type; the slot's ``bits`` parameter then holds the type's index in ``GGML_TYPE_NAMES`` (ordered
    by bits per weight, so "one notch up" means more bytes) and its group size is fixed."""

    slots: tuple[Slot, ...]
    symmetric: bool
    source: str
    spec: Mapping[str, Any]
    scheme: str = "affine"

    @property
    def is_ggml(self) -> bool:
        return self.scheme == "ggml"

    def choice_setting(self, bits: int, group_size: int) -> LayerQuant:
        """The setting of one (bits, group size) choice of a slot (a type index in a ggml space)."""
        if self.is_ggml:
            return LayerQuant.of_ggml(GGML_TYPE_NAMES[bits])
        return LayerQuant(bits, group_size, self.symmetric)

    def value_label(self, p: SpaceParam, v: int) -> str:
        return GGML_TYPE_NAMES[v] if self.is_ggml and p.kind == "bits" else str(v)

    @property
    def params(self) -> dict[str, SpaceParam]:
        out: dict[str, SpaceParam] = {}
        for s in self.slots:
            out[s.bits.name] = s.bits
            out[s.group_size.name] = s.group_size
        return out

    @property
    def tunable(self) -> list[SpaceParam]:
        return [p for p in self.params.values() if p.is_tunable]

    @property
    def fingerprint(self) -> str:
        import hashlib

        blob = json.dumps(
            [(s.block, s.group, s.fqns, s.bits.values, s.group_size.values) for s in self.slots]
            + [self.symmetric]
            + ([self.scheme] if self.is_ggml else [])
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def setting(self, slot: Slot, values: Mapping[str, int]) -> LayerQuant:
        bits = int(values[slot.bits.name]) if slot.bits.name in values else slot.bits.values[0]
        gs = int(values[slot.group_size.name]) if slot.group_size.name in values else slot.group_size.values[0]
        return self.choice_setting(bits, gs)

    def decode(self, values: Mapping[str, Any]) -> QuantPlan:
        """Parameter dict (tunable names required, fixed names optional) -> plan."""
        full = self.complete(values)
        layers: dict[str, LayerQuant] = {}
        for slot in self.slots:
            lq = self.setting(slot, full)
            for fqn in slot.fqns:
                layers[fqn] = lq
        return QuantPlan(layers)

    def complete(self, values: Mapping[str, Any], what: str = "parameters") -> dict[str, int]:
        """Validate a parameter dict and fill in fixed values. Raises UserError naming the entry."""
        params = self.params
        out: dict[str, int] = {}
        for key, val in values.items():
            p = params.get(key)
            if p is None:
                raise UserError(f"{what}: {key!r} is not a parameter of the space {self.source} (names look like {next(iter(params))!r})")
            try:
                ival = int(val)
            except (TypeError, ValueError):
                raise UserError(f"{what}: {key!r} = {val!r} is not an integer") from None
            if ival != val or ival not in p.values:
                raise UserError(f"{what}: {key!r} = {val!r} is not allowed; choose from {list(p.values)}")
            out[key] = ival
        for name, p in params.items():
            if name not in out:
                if p.is_tunable:
                    raise UserError(f"{what}: missing {name!r} (one of {list(p.values)})")
                out[name] = p.values[0]
        return out

    def encode(self, plan: QuantPlan) -> dict[str, int]:
        """Plan -> the tunable parameters. Every slot's linears must share one allowed setting."""
        out: dict[str, int] = {}
        for slot in self.slots:
            settings = {plan.setting(f) for f in slot.fqns}
            if len(settings) != 1:
                raise UserError(
                    f"plan gives different settings to the linears of block {slot.block}{' group ' + slot.group if slot.group else ''}, which the space ties together"
                )
            lq = settings.pop()
            if self.is_ggml != bool(lq.ggml_type):
                raise UserError(
                    f"plan gives {lq.label()} to block {slot.block}, but the space {self.source} takes "
                    + ("ggml types" if self.is_ggml else "bits and group sizes")
                )
            bits_value = GGML_TYPE_NAMES.index(lq.ggml_type) if self.is_ggml else lq.bits
            for p, v in ((slot.bits, bits_value), (slot.group_size, lq.group_size)):
                if v not in p.values:
                    if p.kind == "group_size" and (not lq.is_quantized or self.is_ggml):
                        v = p.values[0]
                    else:
                        raise UserError(
                            f"plan value {self.value_label(p, v)} for {p.name!r} is outside the space's choices "
                            f"{[self.value_label(p, x) for x in p.values]}"
                        )
                if p.is_tunable:
                    out[p.name] = v
        return out

    def cheapest(self) -> dict[str, int]:
        """Parameters with the fewest bits and the largest groups everywhere (not necessarily minimal size with mixed per-channel choices)."""
        vals: dict[str, int] = {}
        for p in self.tunable:
            if p.kind == "bits":
                vals[p.name] = min(p.values)
            else:
                vals[p.name] = max(p.values, key=lambda g: float("inf") if g == PER_CHANNEL else g)
        return vals

    def uniform(self, bits: int, group_size: int | None = None, *, check_fixed: bool = True) -> dict[str, int] | None:
        """Tunable parameters of the uniform plan, or None when some slot cannot take it.

        ``group_size=None`` sets only the bit widths (for spaces without tunable group sizes);
        ``check_fixed=False`` ignores the fixed parameters (seeds only set the tunable ones)."""
        vals: dict[str, int] = {}
        for p in self.tunable:
            if p.kind != "bits" and group_size is None:
                continue
            v = bits if p.kind == "bits" else group_size
            if v not in p.values:
                return None
            vals[p.name] = v
        if check_fixed:
            for p in self.params.values():
                if not p.is_tunable and p.values[0] != (bits if p.kind == "bits" else group_size):
                    return None
        return vals


def _err(source: str, msg: str) -> UserError:
    return UserError(f"parameter space {source}: {msg}")


def load_space_json(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"parameter space file not found: {p}")
    try:
        spec = json.loads(read_text_utf8(p, "parameter space"))
    except json.JSONDecodeError as err:
        raise UserError(f"parameter space {p} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(spec, dict):
        raise UserError(f'parameter space {p} must be a JSON object with a "parameters" list')
    return spec


def _groups(spec: Mapping[str, Any], layers: ModelLayers, source: str) -> dict[int, dict[str, tuple[str, ...]]]:
    """block -> group name -> fqns, per the granularity."""
    gran = spec.get("granularity", "block")
    out: dict[int, dict[str, tuple[str, ...]]] = {}
    block_linears = {b: layers.in_block(b) for b in range(layers.n_blocks)}
    if gran == "block":
        return {b: {"": tuple(li.fqn for li in lis)} for b, lis in block_linears.items()}
    if gran == "linear":
        return {b: {li.name: (li.fqn,) for li in lis} for b, lis in block_linears.items()}
    if not isinstance(gran, list) or not gran:
        raise _err(source, f'granularity must be "block", "linear" or a non-empty list of {{"name", "regex"}} groups, got {gran!r}')
    compiled = []
    for i, g in enumerate(gran):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not isinstance(g.get("regex"), str) or not g["name"]:
            raise _err(source, f'granularity[{i}] must be {{"name": str, "regex": str}}, got {g!r}')
        try:
            compiled.append((g["name"], re.compile(g["regex"])))
        except re.error as err:
            raise _err(source, f"granularity group {g['name']!r} has an invalid regex {g['regex']!r}: {err}") from err
    used = {name: False for name, _ in compiled}
    for b, lis in block_linears.items():
        groups: dict[str, list[str]] = {}
        for li in lis:
            hits = [name for name, rx in compiled if rx.fullmatch(li.name)]
            if not hits:
                raise _err(
                    source,
                    f'linear {li.fqn} (block-relative name {li.name!r}) matches no granularity group; add a group such as {{"name": "rest", "regex": ".*"}}',
                )
            if len(hits) > 1:
                raise _err(source, f"linear {li.fqn} matches several granularity groups {hits}; make the regexes disjoint")
            groups.setdefault(hits[0], []).append(li.fqn)
            used[hits[0]] = True
        out[b] = {name: tuple(fqns) for name, fqns in groups.items()}
    unused = [n for n, u in used.items() if not u]
    if unused:
        raise _err(
            source,
            f"granularity group regex {unused[0]!r} matches no layer of the model (linear names look like {layers.linears[0].name!r})",
        )
    return out


def build_space(spec: Mapping[str, Any], layers: ModelLayers, source: str = "<space>") -> SearchSpace:
    """Validate a space spec against the model's layers and build the SearchSpace."""
    if not isinstance(spec.get("parameters"), list) or not spec["parameters"]:
        raise _err(source, 'needs a non-empty "parameters" list')
    symmetric = spec.get("symmetric", False)
    if not isinstance(symmetric, bool):
        raise _err(source, f'"symmetric" must be true or false, got {symmetric!r}')
    scheme = spec.get("scheme", "affine")
    if scheme not in SCHEMES:
        raise _err(source, f'"scheme" must be one of {list(SCHEMES)}, got {scheme!r}')
    ggml = scheme == "ggml"
    groups = _groups(spec, layers, source)
    by_kind: dict[str, dict[tuple[int, str], SpaceParam]] = {}
    for pi, pspec in enumerate(spec["parameters"]):
        kind = _param_kind(pi, pspec, ggml, source)
        if kind in by_kind:
            raise _err(source, f"parameter {pspec['name']!r} is defined twice")
        by_kind[kind] = _build_param(spec, pspec, kind, ggml, groups, layers, source)
    if ggml and "bits" in by_kind:  # the block size is the type's: a fixed group parameter per slot
        by_kind["group_size"] = {
            key: SpaceParam("ggml_block:" + p.name, "group_size", p.block, p.group, (PER_CHANNEL,), True)
            for key, p in by_kind["bits"].items()
        }
    if set(by_kind) != {"bits", "group_size"}:
        raise _err(source, 'needs a "ggml_type" parameter' if ggml else 'needs both a "bitwidth" and a "groupsize" parameter')
    slots = _build_slots(by_kind, groups, layers, ggml, source)
    all_names = [n for s in slots for n in (s.bits.name, s.group_size.name)]
    if len(set(all_names)) != len(all_names):
        raise _err(source, "bitwidth and groupsize name formats produce the same names")
    return SearchSpace(tuple(slots), symmetric, source, spec, scheme)


def _param_kind(pi: int, pspec: Any, ggml: bool, source: str) -> str:
    if not isinstance(pspec, dict):
        raise _err(source, f"parameters[{pi}] must be an object")
    pname = pspec.get("name")
    if ggml:
        if pname not in GGML_NAMES:
            raise _err(source, f'parameters[{pi}] has name {pname!r}; a ggml space has one parameter, "ggml_type"')
        return "bits"
    kind = "bits" if pname in BITS_NAMES else "group_size" if pname in GROUP_NAMES else None
    if kind is None:
        raise _err(source, f'parameters[{pi}] has name {pname!r}; use "bitwidth" or "groupsize" (or "scheme": "ggml" and "ggml_type")')
    return kind


def _build_param(
    spec: Mapping[str, Any],
    pspec: dict[str, Any],
    kind: str,
    ggml: bool,
    groups: dict[int, dict[str, tuple[str, ...]]],
    layers: ModelLayers,
    source: str,
) -> dict[tuple[int, str], SpaceParam]:
    """One parameter spec -> its SpaceParam per (block, group), covering every slot once."""
    pname = pspec["name"]
    granularity = spec.get("granularity", "block")
    fmt = pspec.get("name_format", f"{pname}.{{i}}." if granularity == "block" else f"{pname}.{{i}}.{{group}}")
    if not isinstance(fmt, str) or "{i}" not in fmt:
        raise _err(source, f"parameter {pname!r}: name_format must contain {{i}}, got {fmt!r}")
    needs_group = granularity != "block"
    if needs_group != ("{group}" in fmt):
        raise _err(
            source,
            f"parameter {pname!r}: name_format {fmt!r} must {'contain' if needs_group else 'not contain'} {{group}} with granularity {granularity!r}",
        )
    entries = pspec.get("layers")
    if not isinstance(entries, list) or not entries:
        raise _err(source, f'parameter {pname!r} needs a non-empty "layers" list')
    assigned: dict[tuple[int, str], SpaceParam] = {}
    for ei, e in enumerate(entries):
        where = f"parameter {pname!r} layers[{ei}]"
        rng, etype, values = _entry_values(where, e, kind, ggml, layers, source)
        only = e.get("groups")
        if only is not None and (not isinstance(only, list) or not all(isinstance(x, str) for x in only)):
            raise _err(source, f'{where}: "groups" must be a list of group names')
        for b in range(rng[0], rng[1]):
            for gname in groups[b]:
                if only is not None and gname not in only:
                    continue
                if (b, gname) in assigned:
                    raise _err(
                        source,
                        f"{where}: block {b}{' group ' + repr(gname) if gname else ''} is already covered by another range (ranges overlap)",
                    )
                ordered = tuple(sorted(values, key=_order)) if etype == "choice" else values
                assigned[(b, gname)] = SpaceParam(
                    fmt.format(i=b, group=gname), kind, b, gname, ordered, etype == "fixed" or len(values) == 1
                )
    _check_coverage(pname, fmt, entries, assigned, groups, layers, source)
    return assigned


def _entry_values(where: str, e: Any, kind: str, ggml: bool, layers: ModelLayers, source: str) -> tuple[list[int], str, tuple[int, ...]]:
    """One ``layers`` entry: its block range, type (fixed or choice) and checked values."""
    if not isinstance(e, dict):
        raise _err(source, f"{where} must be an object")
    rng = e.get("range")
    if (
        not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in rng))
        or rng[0] < 0
        or rng[0] >= rng[1]
    ):
        raise _err(source, f"{where}: range must be [start, end) with 0 <= start < end, got {rng!r}")
    if rng[1] > layers.n_blocks:
        raise _err(source, f"{where}: range {rng} goes past the model's {layers.n_blocks} blocks (valid: 0..{layers.n_blocks})")
    etype = e.get("type")
    if etype == "fixed":
        if "value" not in e:
            raise _err(source, f'{where}: a fixed entry needs "value"')
        values: tuple[int, ...] = (e["value"],)
    elif etype == "choice":
        vals = e.get("values")
        if not isinstance(vals, list) or not vals:
            raise _err(source, f'{where}: a choice entry needs a non-empty "values" list')
        if len(set(vals)) != len(vals):
            raise _err(source, f"{where}: values {vals} repeat an entry")
        values = tuple(vals)
    else:
        raise _err(source, f'{where}: type must be "fixed" or "choice", got {etype!r}')
    if ggml:  # type names -> their index, checked against every row they would quantize
        try:
            values = tuple(GGML_TYPE_NAMES.index(ggml_check_type(v)) for v in values)
        except UserError as err:
            raise _err(source, f"{where}: {err}") from None
        if len(set(values)) != len(values):
            raise _err(source, f"{where}: values repeat a type")
        return rng, etype, values
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(source, f"{where}: value {v!r} is not an integer")
        try:
            LayerQuant(v, PER_CHANNEL) if kind == "bits" else LayerQuant(4, v)
        except UserError as err:
            raise _err(source, f"{where}: {err}") from None
    return rng, etype, values


def _check_coverage(
    pname: str,
    fmt: str,
    entries: list[Any],
    assigned: dict[tuple[int, str], SpaceParam],
    groups: dict[int, dict[str, tuple[str, ...]]],
    layers: ModelLayers,
    source: str,
) -> None:
    if only_groups := [g for e in entries if isinstance(e, dict) for g in (e.get("groups") or [])]:
        known = {g for gs in groups.values() for g in gs}
        bad = [g for g in only_groups if g not in known]
        if bad:
            raise _err(source, f"parameter {pname!r} names unknown group {bad[0]!r} (groups: {sorted(known)})")
    missing = [(b, g) for b in range(layers.n_blocks) for g in groups[b] if (b, g) not in assigned]
    if missing:
        b, g = missing[0]
        raise _err(
            source,
            f"parameter {pname!r} does not cover block {b}{' group ' + repr(g) if g else ''} ({len(missing)} uncovered); ranges must cover blocks 0..{layers.n_blocks - 1}",
        )
    names = [p.name for p in assigned.values()]
    if len(set(names)) != len(names):
        raise _err(source, f"parameter {pname!r}: name_format {fmt!r} gives the same name to two slots")


def _build_slots(
    by_kind: dict[str, dict[tuple[int, str], SpaceParam]],
    groups: dict[int, dict[str, tuple[str, ...]]],
    layers: ModelLayers,
    ggml: bool,
    source: str,
) -> list[Slot]:
    """One slot per (block, group), its choices checked against every linear it quantizes."""
    infos = layers.by_fqn()
    slots = []
    for b in range(layers.n_blocks):
        for gname, fqns in groups[b].items():
            bp, gp = by_kind["bits"][(b, gname)], by_kind["group_size"][(b, gname)]
            if ggml:
                for code in bp.values:
                    for fqn in fqns:
                        try:
                            ggml_effective_type(GGML_TYPE_NAMES[code], infos[fqn].in_features)
                        except UserError as err:
                            raise _err(source, f"{bp.name} on {fqn}: {err}") from None
            for gsize in gp.values:
                for fqn in fqns:
                    inf = infos[fqn].in_features
                    if gsize != PER_CHANNEL and inf % gsize:
                        raise _err(
                            source,
                            f"groupsize {gsize} ({gp.name}) does not divide in_features={inf} of {fqn}; ragged groups are rejected: use divisors of {inf} or -1",
                        )
            slots.append(Slot(b, gname, fqns, bp, gp))
    return slots


def _order(v: int) -> float:
    return float("inf") if v == PER_CHANNEL else float(v)


def load_space(path: str | Path, layers: ModelLayers) -> SearchSpace:
    return build_space(load_space_json(path), layers, str(path))


def default_space_spec(
    layers: ModelLayers, bits: Sequence[int] = (2, 3, 4, 5, 6, 8), group_sizes: Sequence[int] | None = None
) -> dict[str, Any]:
    """A per-block space over every block, with group sizes that divide every layer's in_features."""
    if group_sizes is None:
        ins = {li.in_features for li in layers.linears}
        group_sizes = [g for g in (32, 64, 128, 192, 256) if all(i % g == 0 for i in ins)] or [PER_CHANNEL]
    n = layers.n_blocks
    return {
        "parameters": [
            {"name": "bitwidth", "name_format": "bitwidth.{i}.", "layers": [{"range": [0, n], "type": "choice", "values": list(bits)}]},
            {
                "name": "groupsize",
                "name_format": "groupsize.{i}.",
                "layers": [{"range": [0, n], "type": "choice", "values": list(group_sizes)}],
            },
        ]
    }


def load_initial_samples(path: str | Path, space: SearchSpace) -> list[dict[str, int]]:
    """Seed-format samples ``{"initial_samples": [{"bitwidth.0.": 5, ...}, ...]}``, validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"initial samples file not found: {p}")
    try:
        obj = json.loads(read_text_utf8(p, "initial samples"))
    except json.JSONDecodeError as err:
        raise UserError(f"initial samples {p} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    samples = obj.get("initial_samples") if isinstance(obj, dict) else None
    if not isinstance(samples, list):
        raise UserError(f'initial samples {p} must be {{"initial_samples": [{{...}}, ...]}}')
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise UserError(f"initial samples {p}: sample {i} is not an object")
        full = space.complete(s, what=f"initial samples {p}: sample {i}")
        out.append({k: v for k, v in full.items() if space.params[k].is_tunable})
    return out


def write_initial_samples(
    path: str | Path, samples: Sequence[Mapping[str, int]], space: SearchSpace, extra: Mapping[str, Any] | None = None
) -> None:
    """Write seed-format samples (fixed values included, as the original tool's files have them)."""
    rows = [space.complete(s) for s in samples]
    payload = {"initial_samples": rows, **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Ax encodings (names are built here and nowhere else)
# ---------------------------------------------------------------------------------------------

#: ``relaxed``: ordered integer choices in Ax, optimised by BoTorch as a continuous relaxation
#: (rounded back to valid choices); ``choice``: the same parameters with Ax's exact discrete local
#: search (minutes per proposal at a few hundred parameters); ``float``: floats in [0, 1] binned
#: to choices outside Ax.
ENCODINGS = ("relaxed", "choice", "float")


@dataclass(frozen=True)
class AxParam:
    """A plain description of one Ax parameter (the driver turns it into an Ax config)."""

    name: str
    kind: str  # "choice" (ordered int values) or "float" (range [0, 1])
    values: tuple[int, ...]


def resolve_encoding(space: SearchSpace, encoding: str) -> str:
    if encoding == "auto":
        return "relaxed"
    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}: use {', '.join(ENCODINGS)}")
    return encoding


def ax_parameters(space: SearchSpace, encoding: str) -> list[AxParam]:
    """``choice``: each tunable parameter is an ordered integer choice. ``float``: a float in [0, 1]
    whose bin (``floor(x * n)``) picks the n-th value; bins keep the values' order."""
    kind = "float" if encoding == "float" else "choice"
    return [AxParam(p.name, kind, p.values) for p in space.tunable]


def to_ax(space: SearchSpace, values: Mapping[str, int], encoding: str) -> dict[str, int | float]:
    """Tunable parameter values -> Ax parameters (a float encodes a value as the centre of its bin)."""
    params = space.params
    out: dict[str, int | float] = {}
    for name, v in values.items():
        p = params[name]
        if not p.is_tunable:
            continue
        if encoding == "float":
            out[name] = (p.values.index(int(v)) + 0.5) / len(p.values)
        else:
            out[name] = int(v)
    return out


def from_ax(space: SearchSpace, ax_values: Mapping[str, Any], encoding: str) -> dict[str, int]:
    """Ax parameters -> tunable parameter values."""
    out: dict[str, int] = {}
    for p in space.tunable:
        raw = ax_values[p.name]
        if encoding == "float":
            idx = min(len(p.values) - 1, max(0, int(float(raw) * len(p.values))))
            out[p.name] = p.values[idx]
        else:
            out[p.name] = int(raw)
    return out
