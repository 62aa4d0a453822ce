"""Quality-gated acceptance of a contributed plugin: what the registry takes (issue 24).

The base generator with the staged plugin fused in makes a cohort for the contributing site,
which the federated gate judges on that site's own data (only aggregates leave); then every
other connected site judges a cohort made for it by the base and one by the fused generator,
so a plugin that makes another site's cases worse is refused. Used by
:func:`synthct.fed.plugin_app.contribute_server`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from synthct.config import SynthctConfig

__all__ = ["PluginGate", "Judging", "judge_contribution", "judge_other_sites", "one_site"]


@dataclass
class PluginGate:
    """How a contribution is judged before the registry takes it: the base generator with the
    plugin fused in makes ``cases_per_class`` cases of every class the site has seen, for that
    site; the federated gate judges them on that site's own data (only aggregates leave) with
    ``rules``. With ``other_sites``, every other connected site then judges a cohort made for it
    by the base and one by the fused generator: the plugin must not make any of them worse (a
    rule the base passes there fails, or a value moves beyond the base's 95 % interval in the
    failing direction). A refused plugin's refusal is recorded with its numbers."""

    reference: Any  # synthct.reference.ReferenceModel
    rules: dict[str, Any] = field(default_factory=dict)
    cases_per_class: int = 8
    bootstrap: int = 100
    other_sites: bool = True


def one_site(config: SynthctConfig, site: str) -> SynthctConfig:
    """``config`` with ``site`` its only site (a plugin is judged on its own site's data)."""
    only = [s for s in config.data.sites if s.name == site]
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"sites": only}),
            "federated": config.federated.model_copy(update={"min_sites": 1}),
        }
    )


@dataclass
class Judging:
    """What judging one contribution needs, for its own site and for the others: the base,
    the staged plugin, the gate's settings, and where the sites are (simulation: ``manifest``,
    ``site_root`` and the simulation's site ``roster``; None in a deployment)."""

    grid: Grid
    gen: Any  # synthct.checkpoint.Generator
    generator_dir: Path
    plugin: Any  # synthct.plugins.registry.Plugin
    gate: PluginGate
    seed: int
    manifest: Path | None
    site_root: Path | None
    roster: list[str]

    @cached_property
    def fused(self) -> Any:
        """The base with the plugin fused in, built once for every site that judges it."""
        from synthct.plugins.merge import fuse

        return fuse(self.gen, [self.plugin])

    def cohort(self, fused: bool, plan: list, out: Path) -> Path:
        """``plan`` made by the base or (``fused``) the base with the plugin fused in."""
        from synthct.cohort import generate_cohort

        if not fused:
            return generate_cohort(self.gen, self.generator_dir, plan, out, seed=self.seed)
        return generate_cohort(
            self.fused, self.generator_dir, plan, out, seed=self.seed, plugins=self.plugin.name
        )

    def judge_at(self, config: SynthctConfig, site: str, node: int, cohorts: list[Path]) -> list:
        """The gate's reports of ``cohorts`` on ``site``'s own data (its ``node`` alone)."""
        from synthct.fed.gate_app import gate_server

        return gate_server(
            self.grid,
            one_site(config, site),
            cohorts,
            nodes=[node],
            manifest=self.manifest,
            reference=self.gate.reference,
            rules=self.gate.rules,
            seed=self.seed,
            bootstrap=self.gate.bootstrap,
            site_root=self.site_root,
            roster=self.roster,
        )


def _plan(site: str, classes: list[str], per_class: int) -> list:
    from synthct.cohort import PlannedCase

    return [PlannedCase(f"{site}-{c}-{i:04d}", c, site) for c in classes for i in range(per_class)]


def judge_contribution(
    judging: Judging, site: str, node: int, config: SynthctConfig
) -> dict[str, Any]:
    """The base with the plugin fused in makes cases of every class its site has seen, for
    that site; the gate judges them on that site's own data (its ``node`` alone, the config
    naming only it: the same in simulation and deployment). Returns the decision with its
    numbers."""
    import tempfile

    from synthct.eval.metric_values import clean_number

    gen, gate = judging.gen, judging.gate
    seen = [c for c in gen.config.labels.classes if judging.plugin.cases(c) > 0]
    if not seen:
        return {"gated": True, "accepted": False, "why": "the site reports no cases of any class"}
    plan = _plan(site, seen, gate.cases_per_class)
    with tempfile.TemporaryDirectory(prefix="synthct-plugin-gate-") as tmp:
        cohort = judging.cohort(True, plan, Path(tmp))
        (report,) = judging.judge_at(config, site, node, [cohort])
    accepted = report["verdict"] == "pass"
    failed = report["failed_rules"]
    return {
        "gated": True,
        "accepted": accepted,
        "why": "its cohort passes the gate"
        if accepted
        else f"its cohort fails the gate: {', '.join(failed)}",
        "verdict": report["verdict"],
        "failed_rules": failed,
        "rules": {
            r["rule"]: {
                "value": clean_number(r["value"]),
                "threshold": clean_number(r["threshold"]),
                "passed": r["passed"],
            }
            for r in report["rules"]
        },
        "cohort": {"cases": len(plan), "classes": seen, "site": site},
        "judged_by": report["real"].get("sites", []),
    }


def _worse_rules(base: dict[str, Any], plugin: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rules on which the plugin's cohort is worse than the base's at one site: the base
    passes and the plugin fails, or the plugin's value lies beyond the base's 95 % interval
    in the rule's failing direction. Each with both values."""
    base_rows = {r["rule"]: r for r in base["rules"]}
    worse = {}
    for row in plugin["rules"]:
        before = base_rows.get(row["rule"])
        if before is None or before["passed"] is None or row["passed"] is None:
            continue  # disabled or not computable in either cohort
        flipped = before["passed"] and not row["passed"]
        ci = before.get("ci")
        beyond = (
            ci is not None
            and row["value"] is not None
            and (row["value"] > ci[1] if row["direction"] == "max" else row["value"] < ci[0])
        )
        if flipped or beyond:
            worse[row["rule"]] = {
                "base": before["value"],
                "base_ci": ci,
                "plugin": row["value"],
                "plugin_passed": row["passed"],
            }
    return worse


def judge_other_sites(
    judging: Judging, others: dict[str, int], config: SynthctConfig, decision: dict[str, Any]
) -> dict[str, Any]:
    """``decision`` (the plugin's own site passed) extended with what the plugin does to every
    other connected site (``others``: site -> node): a cohort for that site from the base and
    one from the fused generator (same seed, every class), both judged on that site's data
    alone; refused when it makes any of them worse (:func:`_worse_rules`)."""
    import tempfile

    classes = list(judging.gen.config.labels.classes)
    judged: dict[str, Any] = {}
    for other, node in sorted(others.items()):
        plan = _plan(other, classes, judging.gate.cases_per_class)
        with tempfile.TemporaryDirectory(prefix="synthct-plugin-others-") as tmp:
            cohorts = [judging.cohort(f, plan, Path(tmp) / f"fused{f:d}") for f in (False, True)]
            base, with_plugin = judging.judge_at(config, other, node, cohorts)
        judged[other] = {
            "base_verdict": base["verdict"],
            "plugin_verdict": with_plugin["verdict"],
            "worse": _worse_rules(base, with_plugin),
        }
    harmed = {s: sorted(j["worse"]) for s, j in judged.items() if j["worse"]}
    decision = {**decision, "other_sites": judged}
    if harmed:
        listed = "; ".join(f"{s}: {', '.join(rules)}" for s, rules in harmed.items())
        decision.update(accepted=False, why=f"it makes other sites' cohorts worse ({listed})")
    return decision
