"""Experiment specs: a base run config plus a grid of arms (router variant x depth x seed).

A spec is YAML::

    name: cpu-mechanism
    description: one line shown in the summary
    base: tiny                      # preset name or YAML path (optional)
    overrides:                      # nested config sections applied on top of `base`
      model: {hidden_size: 128, num_hidden_layers: 8}
      train: {max_steps: 700}
    seeds: [0, 1]
    depths: [8]                     # optional; default = the base config's num_hidden_layers
    reference: smoe                 # differences are reported against this arm
    budget:
      flops_reference: rmoe         # arms with `match: flops` get this arm's training FLOPs
      time_limit_s: 0               # optional wall-clock cap per arm (train.time_limit_s)
    eval:
      splits: [valid, test]
      batches: 16                   # fixed held-out slice: the first `batches` x `batch_size`
      batch_size: 8                 #   non-overlapping windows of each split
      routing_tokens: 16384         # tokens of the test split used for IB/OB/entropy/MI
      bootstrap: 2000
      tasks: [rmoe_pydoc_mc]        # optional: lm-evaluation-harness tasks run on every arm
      task_limit: 200               #   (acc/<task> columns; pip install 'rmoe[eval]'), items
      task_include: [./my_tasks]    #   per task, and folders of local task YAMLs
    workers: 2
    arms:
      - {name: smoe, router: linear}
      - {name: rmoe, router: recurrent}
      - {name: smoe-flops, router: linear, match: flops, seeds: [0]}
      - {name: rmoe-p64, router: recurrent, set: {model.router_dim: 64}}
      - {name: cont, init_from: models/qwen3-rmoe}   # continue training a checkpoint
    sweep:                          # optional: EVERY arm runs each setting (the same tuning
      - {name: normal}              #   budget for all); an arm's setting is chosen on
      - {name: uniform, set: {model.router_init: uniform}}   # compare.select_on
    compare:                        # optional
      margin: 0.01                  # TOST equivalence margin, bits/byte
      alpha: 0.05                   # test level (intervals are 1 - 2 alpha for TOST)
      select_on: valid              # split a swept arm's setting is chosen on
      report_on: test               # split comparisons are reported on
    results: experiments/results/NAME   # optional: small per-run results to commit; a rerun
                                        #   (any machine) treats the runs found there as done

A swept arm `a` with setting `s` runs as the arm `a@s` (family `a`, setting `s`); `set:` keys of
the setting are applied after the arm's own. `reference` and `budget.flops_reference` name
families: a FLOP-matched arm gets the flops of the reference family at the same setting.
      - {name: rmoe-lossfree, router: recurrent,
         set: {model.router_score_func: sigmoid, model.router_expert_bias: true,
               model.router_aux_loss_coef: 0.0}}

Arms that start from a checkpoint. `init_from: PATH` (a run directory or a model directory
with config.json, as `rmoe train --init-from` takes) makes the arm continue training that
model: its `model:` section is the checkpoint's architecture (read from PATH's config.json
when the runs are planned; the spec's model overrides and router presets do not apply, an
arm's own `model.*` keys in `set:` still do), its weights and tokenizer come from PATH, and its
steps, data, optimiser and seeds are the spec's as for any arm. A relative PATH is resolved
against the working directory `rmoe experiment` runs in (like `results:`), not the spec file's
folder. `router:` is optional for such an arm (shown as `checkpoint`); when given it must name
a variant whose keys the checkpoint already has (a check, not a change: the recurrent router
is retrofitted by `rmoe import --router recurrent`, so "continue with the original router" vs
"retrofit the recurrent router" is two arms pointing at two imports of the same model). Its
FLOPs and `match: flops` budget count the continued training only. Specs without `init_from`
read, plan and export exactly as before.

Router variants (`router:`) name a set of model keys; see `ROUTER_VARIANTS` (built from the
router registry, `rmoe.registry.ROUTERS`, and each router class's presets).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ..formatting import yaml_error_line
from ..modeling.routing import router_presets
from ..registry import nearest
from ..training.config import TrainConfig, from_dict, load_config, set_key

# router variant -> model keys it sets (every other router key keeps the base value): one per
# registered router ("linear", ..., "recurrent") plus each router class's named presets
# ("recurrent-np", "recurrent-detach", "recurrent-xmoe", "recurrent-np-r0.5", "recurrent-np-r1",
# "recurrent-detach-r", "recurrent-sproj"); see `Router.presets`. An arm's `set:` keys are
# applied after its variant's keys, so any variant composes with any score function, balancing
# and capacity setting.
ROUTER_VARIANTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(keys) for name, keys in router_presets().items()}
)

MATCH_MODES = ("tokens", "flops")
_SPEC_KEYS = {
    "name",
    "description",
    "base",
    "overrides",
    "seeds",
    "depths",
    "reference",
    "budget",
    "eval",
    "workers",
    "threads",
    "arms",
    "notes",
    "sweep",
    "compare",
    "results",
}
_COMPARE_KEYS = {"margin", "alpha", "select_on", "report_on"}
_ARM_KEYS = {"name", "router", "set", "seeds", "depths", "match", "label", "init_from"}
CHECKPOINT_ROUTER = "checkpoint"
"""The `router` shown for an `init_from` arm that names none (its router is the checkpoint's)."""
_EVAL_KEYS = {"splits", "batches", "batch_size", "routing_tokens", "bootstrap", "mi_bins"}
_TASK_KEYS = ("tasks", "task_limit", "task_include")
"""The optional downstream-task keys of `eval:` (left out of `ExperimentSpec.to_dict` when
`tasks` is empty, so a spec without them reads exactly as before they existed)."""
_BUDGET_KEYS = {"flops_reference", "time_limit_s"}


@dataclass
class ArmSpec:
    """One arm of the grid before expansion over seeds and depths.

    Attributes:
        name: short id (letters, digits, `-`, `_`), used in run-directory names.
        router: a key of `ROUTER_VARIANTS`.
        set: extra `section.key: value` overrides for this arm only, applied after the
            router variant's model keys (so they win over them).
        seeds: seeds of this arm (None = the spec's seeds).
        depths: depths of this arm (None = the spec's depths).
        match: `tokens` (the base max_steps) or `flops` (steps so that total training FLOPs
            equal the budget's `flops_reference` arm at the same depth and seed).
        label: display name in tables and plots (default: name).
        family: the arm's name before the sweep expanded it (= name when not swept).
        setting: the sweep setting this arm runs ("" when the spec has no sweep).
        init_from: run or model directory the arm continues training from (None = a fresh
            model); relative to the working directory. See "Arms that start from a
            checkpoint" in the module doc.
    """

    name: str
    router: str
    set: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    depths: list[int] | None = None
    match: str = "tokens"
    label: str = ""
    family: str = ""
    setting: str = ""
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.family:
            self.family = self.name


@dataclass
class SweepSetting:
    """One setting of the spec's tuning sweep, run by every arm.

    Attributes:
        name: short id (letters, digits, `-`, `_`, `.`), appended to arm names as `@name`.
        set: `section.key: value` overrides of this setting (applied after the arm's own).
    """

    name: str
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareSpec:
    """How arms are compared.

    Attributes:
        margin: equivalence margin delta of the TOST verdict, bits per byte (|diff| < delta
            counts as equivalent when the whole 1 - 2 alpha interval lies inside).
        alpha: level of each one-sided test.
        select_on: split on which a swept arm's setting is chosen (lowest mean bits/byte over
            seeds).
        report_on: split on which comparisons and verdicts are reported.
    """

    margin: float = 0.01
    alpha: float = 0.05
    select_on: str = "valid"
    report_on: str = "test"


@dataclass
class EvalSpec:
    """The fixed post-training evaluation (identical for every arm).

    Attributes:
        splits: corpus splits evaluated (bits per byte on each).
        batches: evaluation batches per split (the first `batches` x `batch_size` windows).
        batch_size: sequences per evaluation batch.
        routing_tokens: tokens (from the start of the last split) used for routing statistics.
        bootstrap: bootstrap resamples of evaluation batches for confidence intervals.
        mi_bins: bin edges of the binned cross-layer MI (paper: 100).
        tasks: lm-evaluation-harness tasks (names, groups or tags; `rmoe.integrations.lm_eval`)
            run on every arm after bits/byte; their metrics become `acc/<task>`-style columns.
            Empty = none (the default).
        task_limit: items per task (None = all).
        task_include: folders of local task YAMLs (lm_eval include paths).
    """

    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    batches: int = 16
    batch_size: int = 8
    routing_tokens: int = 16384
    bootstrap: int = 2000
    mi_bins: int = 100
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    task_include: list[str] = field(default_factory=list)


@dataclass
class ExperimentSpec:
    """A whole experiment; see the module docstring for the YAML form.

    Attributes:
        name: experiment name (default output folder name).
        description: one line for the summary.
        base: preset or YAML path the run configs start from (None = defaults).
        overrides: nested `{section: {key: value}}` applied to the base.
        seeds: default seeds of every arm.
        depths: default depths (None = the base config's num_hidden_layers).
        reference: arm (family) name that paired differences are taken against.
        flops_reference: arm name whose training FLOPs `match: flops` arms receive.
        time_limit_s: wall-clock cap per arm in seconds (0 = none).
        eval: the post-training evaluation.
        workers: default number of arms trained at once.
        threads: torch CPU threads per arm (0 = cores // workers).
        arms: the arms (after the sweep expanded them: `family@setting`).
        notes: free text copied into the summary.
        sweep: the tuning sweep every arm ran (empty = none).
        compare: margins and splits of the comparison.
        results: folder of small committed per-run results (None = none), relative to the
            working directory.
    """

    name: str
    arms: list[ArmSpec]
    description: str = ""
    base: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    depths: list[int] | None = None
    reference: str | None = None
    flops_reference: str | None = None
    time_limit_s: float = 0.0
    eval: EvalSpec = field(default_factory=EvalSpec)
    workers: int = 1
    threads: int = 0
    notes: str = ""
    sweep: list[SweepSetting] = field(default_factory=list)
    compare: CompareSpec = field(default_factory=CompareSpec)
    results: str | None = None

    def families(self) -> list[str]:
        """Arm names before the sweep, in spec order."""
        return list(dict.fromkeys(a.family for a in self.arms))

    def family_arms(self, family: str) -> list[ArmSpec]:
        """The arms of one family (one per sweep setting; the arm itself without a sweep)."""
        return [a for a in self.arms if a.family == family]

    def arm_for(self, family: str, setting: str = "") -> ArmSpec:
        """The arm of `family` that runs sweep `setting` (ValueError naming the arms)."""
        for a in self.arms:
            if a.family == family and a.setting == setting:
                return a
        return self.arm(family if not setting else f"{family}@{setting}")

    def arm(self, name: str) -> ArmSpec:
        """The arm called `name` (ValueError naming the arms otherwise)."""
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(
            f"no arm {name!r} in spec {self.name!r}; arms: {[a.name for a in self.arms]}"
        )

    def base_config(self) -> TrainConfig:
        """The base TrainConfig: `base` preset/file, then `overrides`."""
        cfg = load_config(self.base) if self.base else TrainConfig()
        raw = cfg.to_dict()
        for sec, body in (self.overrides or {}).items():
            if sec not in raw:
                raise ValueError(
                    f"spec {self.name!r}: unknown overrides section {sec!r}; expected model, data, "
                    "optim or train"
                )
            if not isinstance(body, dict):
                raise ValueError(f"spec {self.name!r}: overrides.{sec} must be a mapping")
            raw[sec].update(copy.deepcopy(body))
        return from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-ready); `eval`'s task keys only when it has tasks, an arm's
        `init_from` only when it has one (so older specs read exactly as before)."""
        import dataclasses

        out = dataclasses.asdict(self)
        if not self.eval.tasks:
            for key in _TASK_KEYS:
                out["eval"].pop(key, None)
        for arm in out["arms"]:
            if arm.get("init_from") is None:
                arm.pop("init_from", None)
        return out


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def spec_names() -> list[str]:
    """Names of the specs shipped with the package (`rmoe/configs/experiments/*.yaml`)."""
    root = resources.files("rmoe") / "configs" / "experiments"
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def spec_text(name_or_path: str) -> str:
    """The YAML text of a shipped spec name or a spec file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"experiment spec {str(path)!r} does not exist")
        return path.read_text()
    names = spec_names()
    if name_or_path not in names:
        import difflib

        near = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.0)
        hint = f" (nearest: {near[0]!r})" if near else ""
        raise ValueError(
            f"unknown experiment spec {name_or_path!r}; shipped specs: {names}{hint} "
            "(or pass a path to a YAML file)"
        )
    return (
        resources.files("rmoe") / "configs" / "experiments" / f"{name_or_path}.yaml"
    ).read_text()


def load_spec(name_or_path: str) -> ExperimentSpec:
    """Read and validate a spec (a shipped name such as `cpu-mechanism`, or a YAML path)."""
    text = spec_text(name_or_path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(
            f"experiment spec {name_or_path!r} is not valid YAML ({yaml_error_line(exc)})"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"experiment spec {name_or_path!r} must be a mapping")
    raw.setdefault("name", Path(name_or_path).stem)
    return spec_from_dict(raw)


def _int_list(value: Any, what: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{what} must be a non-empty list of integers, got {value!r}")
    return list(value)


def _check_keys(body: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(allowed), n=1, cutoff=0.0)
        hint = f" (nearest: {near[0]!r})" if near else ""
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; valid: {sorted(allowed)}{hint}")


def spec_from_dict(raw: dict[str, Any]) -> ExperimentSpec:
    """Build and validate an ExperimentSpec from a parsed YAML mapping."""
    raw = copy.deepcopy(raw)
    _check_keys(raw, _SPEC_KEYS, "the experiment spec")
    name = str(raw.get("name") or "experiment")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise ValueError(f"spec {name!r} needs a non-empty list `arms`")
    arms = []
    for i, a in enumerate(arms_raw):
        if not isinstance(a, dict):
            raise ValueError(f"spec {name!r}: arms[{i}] must be a mapping with name and router")
        _check_keys(a, _ARM_KEYS, f"arms[{i}]")
        init_from = a.get("init_from")
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ValueError(
                f"spec {name!r}: arms[{i}].init_from must be a path, got {init_from!r}"
            )
        if init_from is not None:
            a.setdefault("router", CHECKPOINT_ROUTER)
        if "name" not in a or "router" not in a:
            raise ValueError(f"spec {name!r}: arms[{i}] needs `name` and `router`")
        arm = ArmSpec(
            init_from=init_from,
            name=str(a["name"]),
            router=str(a["router"]),
            set=dict(a.get("set") or {}),
            seeds=_int_list(a["seeds"], f"arms[{i}].seeds") if "seeds" in a else None,
            depths=_int_list(a["depths"], f"arms[{i}].depths") if "depths" in a else None,
            match=str(a.get("match", "tokens")),
            label=str(a.get("label") or a["name"]),
        )
        arms.append(arm)
    sweep = _parse_sweep(raw.get("sweep"), name)
    if sweep:
        arms = [_swept(a, s) for a in arms for s in sweep]
    compare_raw = raw.get("compare") or {}
    _check_keys(compare_raw, _COMPARE_KEYS, "compare")
    compare = CompareSpec(**compare_raw)
    ev_raw = raw.get("eval") or {}
    _check_keys(ev_raw, _EVAL_KEYS | set(_TASK_KEYS), "eval")
    ev = EvalSpec(**ev_raw)
    if isinstance(ev.tasks, str):
        ev.tasks = [t.strip() for t in ev.tasks.split(",") if t.strip()]
    if isinstance(ev.task_include, str):
        ev.task_include = [ev.task_include]
    budget = raw.get("budget") or {}
    _check_keys(budget, _BUDGET_KEYS, "budget")
    spec = ExperimentSpec(
        name=name,
        arms=arms,
        description=str(raw.get("description", "")),
        base=raw.get("base"),
        overrides=dict(raw.get("overrides") or {}),
        seeds=_int_list(raw.get("seeds", [0]), "seeds"),
        depths=_int_list(raw["depths"], "depths") if raw.get("depths") is not None else None,
        reference=raw.get("reference"),
        flops_reference=budget.get("flops_reference"),
        time_limit_s=float(budget.get("time_limit_s", 0.0)),
        eval=ev,
        workers=int(raw.get("workers", 1)),
        threads=int(raw.get("threads", 0)),
        notes=str(raw.get("notes", "")),
        sweep=sweep,
        compare=compare,
        results=str(raw["results"]) if raw.get("results") else None,
    )
    validate_spec(spec)
    return spec


def _parse_sweep(value: Any, spec_name: str) -> list[SweepSetting]:
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise ValueError(f"spec {spec_name!r}: sweep must be a non-empty list of {{name, set}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"spec {spec_name!r}: sweep[{i}] must be a mapping with a name")
        _check_keys(item, {"name", "set"}, f"sweep[{i}]")
        out.append(SweepSetting(str(item["name"]), dict(item.get("set") or {})))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"spec {spec_name!r}: sweep setting names must be unique, got {names}")
    return out


def _swept(arm: ArmSpec, setting: SweepSetting) -> ArmSpec:
    """`arm` running sweep `setting`: named `arm@setting`, the setting's keys after the arm's."""
    return ArmSpec(
        name=f"{arm.name}@{setting.name}",
        router=arm.router,
        set={**arm.set, **setting.set},
        seeds=arm.seeds,
        depths=arm.depths,
        match=arm.match,
        label=f"{arm.label}@{setting.name}",
        family=arm.name,
        setting=setting.name,
        init_from=arm.init_from,
    )


def validate_spec(spec: ExperimentSpec) -> None:
    """Raise ValueError on an inconsistent spec (names, variants, references, eval settings)."""
    import re

    seen = set()
    for s in spec.sweep:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s.name):
            raise ValueError(
                f"sweep setting {s.name!r} must be letters, digits, '-', '_' or '.' (used in paths)"
            )
    for a in spec.arms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", a.family):
            raise ValueError(
                f"arm name {a.family!r} must be letters, digits, '-', '_' or '.' (used in paths)"
            )
        if a.name in seen:
            raise ValueError(f"arm name {a.name!r} appears twice in spec {spec.name!r}")
        seen.add(a.name)
        if not (a.init_from and a.router == CHECKPOINT_ROUTER) and a.router not in ROUTER_VARIANTS:
            raise ValueError(
                f"arm {a.name!r}: unknown router {a.router!r}; expected one of "
                f"{list(ROUTER_VARIANTS)}" + nearest(a.router, ROUTER_VARIANTS)
            )
        if a.match not in MATCH_MODES:
            raise ValueError(f"arm {a.name!r}: match={a.match!r}; expected tokens or flops")
        if a.match == "flops" and not spec.flops_reference:
            raise ValueError(
                f"arm {a.name!r} has match: flops but the spec has no budget.flops_reference"
            )
    families = spec.families()
    for ref, what in (
        (spec.reference, "reference"),
        (spec.flops_reference, "budget.flops_reference"),
    ):
        if ref is not None and ref not in families:
            raise ValueError(f"spec {spec.name!r}: {what}={ref!r} is not an arm; arms: {families}")
    if spec.flops_reference and any(
        a.match != "tokens" for a in spec.family_arms(spec.flops_reference)
    ):
        raise ValueError("budget.flops_reference must itself be a `match: tokens` arm")
    c = spec.compare
    splits = ("train", "valid", "test")
    if not c.margin > 0 or not 0 < c.alpha < 0.5:
        raise ValueError(f"compare: margin must be > 0 and alpha in (0, 0.5), got {c}")
    if c.select_on not in splits or c.report_on not in splits:
        raise ValueError(f"compare: select_on and report_on must be train/valid/test, got {c}")
    if spec.sweep and c.select_on == c.report_on:
        raise ValueError(
            f"compare: a sweep's setting must be chosen on another split than the one it is "
            f"reported on (select_on = report_on = {c.select_on!r}); use select_on: valid"
        )
    e = spec.eval
    if e.batches < 1 or e.batch_size < 1 or e.bootstrap < 0 or e.routing_tokens < 0:
        raise ValueError(
            "eval.batches and eval.batch_size must be >= 1, eval.bootstrap and "
            f"eval.routing_tokens >= 0; got {e}"
        )
    if not e.splits or any(s not in ("train", "valid", "test") for s in e.splits):
        raise ValueError(
            f"eval.splits must be a non-empty subset of train/valid/test, got {e.splits}"
        )
    _validate_tasks(e)
    if spec.workers < 1:
        raise ValueError(f"workers must be >= 1, got {spec.workers}")
    # every arm's config must build (an init_from arm's model is the checkpoint's: checked when
    # the runs are planned, since the checkpoint may be made after the spec is written)
    base = spec.base_config()
    for a in spec.arms:
        if a.init_from:
            continue
        cfg = copy.deepcopy(base)
        for key, value in ROUTER_VARIANTS[a.router].items():
            cfg.model[key] = value
        for key, value in a.set.items():
            set_key(cfg, key, value)
        cfg.validate()


def _validate_tasks(e: EvalSpec) -> None:
    """Raise ValueError on bad `eval.tasks` / `task_limit` / `task_include`, or on tasks asked
    for without lm-evaluation-harness installed."""
    if not isinstance(e.tasks, list) or not all(isinstance(t, str) and t for t in e.tasks):
        raise ValueError(f"eval.tasks must be a list of lm_eval task names, got {e.tasks!r}")
    if e.task_limit is not None and (not isinstance(e.task_limit, int) or e.task_limit < 1):
        raise ValueError(f"eval.task_limit must be an integer >= 1 or null, got {e.task_limit!r}")
    if not isinstance(e.task_include, list) or not all(isinstance(p, str) for p in e.task_include):
        raise ValueError(f"eval.task_include must be a list of folders, got {e.task_include!r}")
    if e.tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(
                "eval.tasks needs lm-evaluation-harness; install it with: pip install 'rmoe[eval]'"
            )


# ----------------------------------------------------------------------------------------------
# quick (scaled-down) variant
# ----------------------------------------------------------------------------------------------
QUICK_MODEL = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": None,
    "moe_intermediate_size": 32,
    "router_dim": 8,
    "router_mlp_hidden": 16,
    "router_xmoe_dim": 4,
    "max_position_embeddings": 32,
}


def quick_spec(spec: ExperimentSpec, steps: int = 6) -> ExperimentSpec:
    """A copy of `spec` shrunk to seconds on a CPU: same arms, routers, matching and dtype, but a
    tiny model (width 32, at most 4 experts, depth 2 or 3), `steps` training steps, at most two
    seeds, and a two-batch evaluation. Used by `rmoe experiment --quick` to smoke-test a spec
    (e.g. a GPU spec on a laptop) before the real run."""
    q = copy.deepcopy(spec)
    q.name = f"{spec.name}-quick"
    q.results = None  # a smoke test never writes into the committed results
    q.seeds = spec.seeds[:2]
    for a in q.arms:
        if a.seeds is not None:
            a.seeds = a.seeds[:2]
        a.depths = None
        a.set = {k: v for k, v in a.set.items() if not k.startswith(("data.", "train.max_steps"))}
        for k in list(a.set):
            if k.startswith("model.") and k[6:] in QUICK_MODEL:
                a.set[k] = QUICK_MODEL[k[6:]]
    base = spec.base_config()
    depths = spec.depths or [base.model.get("num_hidden_layers", 4)]
    q.depths = [2] if len(depths) == 1 else [2, 3]
    model = {k: v for k, v in QUICK_MODEL.items() if k in _model_keys()}
    model["head_dim"] = None
    model["num_experts"] = min(int(base.model.get("num_experts", 8)), 4)
    model["num_experts_per_tok"] = min(int(base.model.get("num_experts_per_tok", 2)), 2)
    model["mlp_only_layers"] = []
    model["num_shared_experts"] = 0
    over = copy.deepcopy(spec.overrides)
    over.setdefault("model", {}).update(model)
    over.setdefault("data", {}).update(
        {"seq_len": 32, "batch_size": 4, "grad_accum": 1, "extra_eval": []}
    )
    over.setdefault("optim", {}).update({"warmup_steps": 2})
    over.setdefault("train", {}).update(
        {
            "max_steps": steps,
            "log_interval": 1,
            "eval_interval": 0,
            "eval_batches": 2,
            "eval_batch_size": 4,
            "save_interval": max(1, steps // 2),
            "eval_at": [],
            "eval_log_points": 0,
            "compile": False,
        }
    )
    q.overrides = over
    q.time_limit_s = 120.0 if spec.time_limit_s else 0.0
    q.eval = EvalSpec(
        splits=list(spec.eval.splits),
        batches=2,
        batch_size=4,
        routing_tokens=256,
        bootstrap=min(spec.eval.bootstrap, 200),
        mi_bins=spec.eval.mi_bins,
        tasks=list(spec.eval.tasks),
        task_limit=min(spec.eval.task_limit or 8, 8) if spec.eval.tasks else None,
        task_include=list(spec.eval.task_include),
    )
    validate_spec(q)
    return q


def _model_keys() -> set[str]:
    from ..training.config import model_field_names

    return set(model_field_names())
