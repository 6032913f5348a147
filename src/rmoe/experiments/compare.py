"""The tuning protocol and the seed-level comparisons between arm families.

Tuning (fair by construction: every family runs the same sweep). For each family and depth, the
sweep setting with the lowest mean bits per byte over its finished seeds on `compare.select_on`
(default valid) is chosen; ties go to the earlier setting in the sweep. A family without a sweep
has one setting, chosen trivially.

Comparisons. Every family other than `spec.reference` is compared at its chosen setting with the
reference family at the reference's own chosen setting, per depth, on `compare.report_on`
(default test): per seed (only seeds both have finished) d_s = bpb(family) - bpb(reference),
summarised by `rmoe.experiments.stats.tost_verdict` (mean, (1 - alpha) t interval over seeds,
(1 - 2 alpha) interval, better / worse / equivalent / inconclusive at `compare.margin`), next
to the paired bootstrap over evaluation batches (`paired_bootstrap`, mean over the same seeds).

If a configured split was not evaluated (not in `eval.splits`), selection falls back to the
first evaluated split and reporting to the last; `effective_splits` says which were used.
"""

from __future__ import annotations

import math
from typing import Any

from .spec import ExperimentSpec
from .stats import mean_std, paired_bootstrap, tost_verdict


def effective_splits(spec: ExperimentSpec) -> tuple[str, str]:
    """(select_on, report_on) actually used: the spec's, or the first / last evaluated split."""
    splits = list(spec.eval.splits)
    sel = spec.compare.select_on if spec.compare.select_on in splits else splits[0]
    rep = spec.compare.report_on if spec.compare.report_on in splits else splits[-1]
    return sel, rep


def _family(row: dict[str, Any]) -> str:
    return row.get("family") or row["arm"]


def _setting(row: dict[str, Any]) -> str:
    return row.get("setting") or ""


def _bpb(row: dict[str, Any], split: str) -> float | None:
    split_res = ((row.get("results") or {}).get("splits") or {}).get(split)
    return None if split_res is None else float(split_res["bpb"])


def family_label(row: dict[str, Any]) -> str:
    """A run's display label without its `@setting` suffix."""
    label, setting = row.get("label") or _family(row), _setting(row)
    if setting and label.endswith(f"@{setting}"):
        return label[: -len(setting) - 1]
    return label


def _family_settings(spec: ExperimentSpec, family: str) -> list[str]:
    return [a.setting for a in spec.family_arms(family)]


def choose_settings(spec: ExperimentSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (family, depth): each setting's mean bits/byte on the selection split and
    the chosen setting (None when no setting has a finished run).

    Entry keys: family, label, depth, split, settings (list of {setting, arm, mean, std, n,
    planned}), chosen, chosen_arm.
    """
    select_on, _ = effective_splits(spec)
    by_key: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((_family(r), r["depth"], _setting(r)), []).append(r)
    depths = sorted({r["depth"] for r in rows})
    out = []
    for family in spec.families():
        settings = _family_settings(spec, family)
        for depth in depths:
            members = {s: by_key.get((family, depth, s), []) for s in settings}
            if not any(members.values()):
                continue
            cells = []
            for s in settings:
                vals = [v for v in (_bpb(r, select_on) for r in members[s]) if v is not None]
                m, sd = mean_std(vals)
                arm = members[s][0]["arm"] if members[s] else spec.arm_for(family, s).name
                cells.append(
                    {
                        "setting": s,
                        "arm": arm,
                        "mean": m,
                        "std": sd,
                        "n": len(vals),
                        "planned": len(members[s]),
                    }
                )
            finished = [c for c in cells if c["n"] > 0]
            best = min(finished, key=lambda c: c["mean"]) if finished else None
            if len(settings) == 1 and best is None:
                best = cells[0]
            first = next(r for s in settings for r in members[s])
            out.append(
                {
                    "family": family,
                    "label": family_label(first),
                    "depth": depth,
                    "split": select_on,
                    "settings": cells,
                    "chosen": best["setting"] if best else None,
                    "chosen_arm": best["arm"] if best else None,
                }
            )
    return out


def compare_families(
    spec: ExperimentSpec, rows: list[dict[str, Any]], tuning: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Seed-level comparisons of each family (at its chosen setting) with the reference family
    (at its chosen setting) on the report split, per depth; see the module docstring.

    Entry keys: family, label, depth, split, selected_on, setting, arm, reference,
    reference_setting, reference_arm, seeds, per_seed ({seed, bpb, ref_bpb, diff}), verdict,
    seed_level (`Verdict.to_dict()`), batch_bootstrap (`PairedDiff.to_dict()` or None).
    """
    if not spec.reference:
        return []
    select_on, report_on = effective_splits(spec)
    chosen = {(t["family"], t["depth"]): t for t in tuning}
    done = {(r["arm"], r["depth"], r["seed"]): r for r in rows if _bpb(r, report_on) is not None}
    out = []
    for t in tuning:
        ref_t = chosen.get((spec.reference, t["depth"]))
        if t["family"] == spec.reference or t["chosen"] is None:
            continue
        if ref_t is None or ref_t["chosen"] is None:
            continue
        depth, arm, ref_arm = t["depth"], t["chosen_arm"], ref_t["chosen_arm"]
        seeds = sorted(
            s for (a, d, s) in done if a == arm and d == depth and (ref_arm, depth, s) in done
        )
        if not seeds:
            continue
        pairs = [(done[(arm, depth, s)], done[(ref_arm, depth, s)]) for s in seeds]
        per_seed = []
        for s, (m, ref) in zip(seeds, pairs, strict=True):
            a, b = _bpb(m, report_on), _bpb(ref, report_on)
            per_seed.append({"seed": s, "bpb": a, "ref_bpb": b, "diff": a - b})
        v = tost_verdict([p["diff"] for p in per_seed], spec.compare.margin, spec.compare.alpha)
        out.append(
            {
                "family": t["family"],
                "label": t["label"],
                "depth": depth,
                "split": report_on,
                "selected_on": select_on,
                "setting": t["chosen"],
                "arm": arm,
                "reference": spec.reference,
                "reference_setting": ref_t["chosen"],
                "reference_arm": ref_arm,
                "seeds": seeds,
                "per_seed": per_seed,
                "verdict": v.verdict,
                "seed_level": v.to_dict(),
                "batch_bootstrap": _pooled_bootstrap(spec, pairs, report_on),
            }
        )
    order = {f: i for i, f in enumerate(spec.families())}
    out.sort(key=lambda e: (e["depth"], order.get(e["family"], 99)))
    return out


def _pooled_bootstrap(
    spec: ExperimentSpec, pairs: list[tuple[dict, dict]], split: str
) -> dict[str, Any] | None:
    """Bootstrap over evaluation batches of the mean over seeds (None without batch arrays)."""
    a = [m["results"]["splits"][split] for m, _ in pairs]
    b = [ref["results"]["splits"][split] for _, ref in pairs]
    if not all("batch_loss_sum" in x for x in a + b):
        return None
    pd = paired_bootstrap(
        [x["batch_loss_sum"] for x in a],
        [x["batch_loss_sum"] for x in b],
        a[0]["batch_tokens"],
        a[0]["tokens_per_byte"],
        spec.eval.bootstrap,
        level=1 - spec.compare.alpha,
    )
    return pd.to_dict()


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def _num(v: float | None, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def _interval(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "–"
    return f"[{lo:+.4f}, {hi:+.4f}]"


def tuning_table(spec: ExperimentSpec, tuning: list[dict[str, Any]]) -> list[str]:
    """The Tuning section: per family and depth, each setting's selection-split mean (seeds in
    parentheses) and the chosen setting."""
    select_on, _ = effective_splits(spec)
    settings = [s.name for s in spec.sweep]
    lines = [
        f"## Tuning (setting chosen on {select_on})",
        "",
        "| arm | L | " + " | ".join(f"`{s}`" for s in settings) + " | chosen |",
        "|---|---|" + "---|" * len(settings) + "---|",
    ]
    for t in tuning:
        cells = {c["setting"]: c for c in t["settings"]}
        row = [t["label"], str(t["depth"])]
        for s in settings:
            c = cells.get(s)
            text = "–" if not c or not c["n"] else f"{c['mean']:.4f} ({c['n']}/{c['planned']})"
            row.append(f"**{text}**" if c and s == t["chosen"] and c["n"] else text)
        row.append(f"`{t['chosen']}`" if t["chosen"] is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [
        "",
        f"Mean {select_on} bits per byte over the finished seeds (finished/planned). Each "
        "family's setting with the lowest mean is chosen per depth (ties: the earlier setting); "
        "comparisons use the chosen settings only.",
        "",
    ]


def comparison_table(spec: ExperimentSpec, comparisons: list[dict[str, Any]]) -> list[str]:
    """The Comparisons section: seed-level paired differences, their intervals and the TOST
    verdict of each family against the reference, with the margin stated."""
    c = spec.compare
    select_on, report_on = effective_splits(spec)
    lvl, tlvl = f"{100 * (1 - c.alpha):g}%", f"{100 * (1 - 2 * c.alpha):g}%"
    swept = bool(spec.sweep)
    head = ["arm", "L"] + (["setting", "ref. setting"] if swept else []) + ["seeds"]
    head += [
        "per seed diff",
        "mean diff",
        f"{lvl} t-interval",
        f"{tlvl} interval (TOST)",
        "verdict",
        f"batch bootstrap {lvl}",
    ]
    title = (
        f"## Comparisons to `{spec.reference}` on {report_on} (bits per byte; negative = better)"
    )
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in comparisons:
        v, bb = e["seed_level"], e["batch_bootstrap"]
        row = [e["label"], str(e["depth"])]
        if swept:
            row += [f"`{e['setting']}`", f"`{e['reference_setting']}`"]
        row += [
            str(len(e["seeds"])),
            "; ".join(f"s{p['seed']}: {p['diff']:+.4f}" for p in e["per_seed"]),
            _num(v["mean"], sign=True),
            _interval(v["lo"], v["hi"]),
            _interval(v["tost_lo"], v["tost_hi"]),
            f"**{e['verdict']}**",
            f"{bb['diff']:+.4f} {_interval(bb['lo'], bb['hi'])}" if bb else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    tuned = (
        f"Each family at its setting chosen on {select_on} (Tuning), the reference at its own. "
        if swept
        else ""
    )
    return lines + [
        "",
        f"{tuned}Paired per seed (same seed and depth): diff = arm - reference on {report_on}. "
        f"Margin δ = ±{c.margin:g} bits/byte, α = {c.alpha:g}: **equivalent** when the {tlvl} "
        f"t-interval lies inside (−δ, +δ) (TOST); else **better** / **worse** when the {lvl} "
        "t-interval lies below / above 0; else **inconclusive** (always with one seed). "
        "t-intervals over seeds use n − 1 degrees of freedom; the batch bootstrap covers "
        "evaluation noise only (the same batches, mean over the same seeds).",
        "",
    ]
