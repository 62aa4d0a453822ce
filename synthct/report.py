"""``RUN/report.html``: one self-contained page (every picture embedded as a PNG data URI).

It opens with what a reader came for: the gate's verdict (and the rules that failed) and the
headline effect of the gated synthetic data downstream (change in balanced accuracy and
rare-class recall, overall and per site), then the evidence: per class, real and synthetic
volumes side by side (axial/coronal/sagittal; real ones only where showing them is allowed:
phantoms, or ``--show-real``); per site, a real scan beside a case made for that site (scanner
style); HU histograms; training curves per site and phase; the gate table; per-site downstream
bars; the run's numbers and provenance (config, versions, hashes) folded at the end
(pictures: ``report_figures.py``). The page carries ``data-expected-images`` so a browser test
can check that every picture rendered.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from synthct.artifacts import atomic_write_text, library_versions
from synthct.report_figures import (
    downstream_bars,
    hu_histograms,
    montage,
    png_uri,
    site_pairs,
    training_curves,
)

__all__ = ["write_report"]

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em}
th{background:#f4f4f4}.pass{color:#11734b;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
img{max-width:100%;display:block;margin:.5em 0}pre{background:#f7f7f7;padding:1em;overflow:auto}
.verdict{font-size:1.3em}.note{color:#555}.pair{display:flex;gap:1em;align-items:flex-start}
.pair figure{margin:0;flex:1}.pair figcaption{font-weight:bold;text-align:center}
.headline{background:#f6f8fa;border:1px solid #ddd;padding:.8em 1.2em;border-radius:6px}
.up{color:#11734b}.down{color:#b3261e}
"""


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _delta(before: float, after: float, effect: dict[str, Any] | None = None) -> str:
    """``before -> after (change)``; with the paired ``effect``, its 95 % interval too."""
    change = after - before if effect is None else effect["mean"]
    cls = "up" if change > 0 else "down" if change < 0 else ""
    ci = "" if effect is None else f", 95 % CI [{effect['ci95'][0]:+.3f}, {effect['ci95'][1]:+.3f}]"
    return f'{before:.3f} &rarr; {after:.3f} (<span class="{cls}">{change:+.3f}</span>{ci})'


def _headline_html(gate: dict[str, Any] | None, downstream: dict[str, Any] | None) -> str:
    """The verdict and the headline downstream effect, in sentences."""
    lines = []
    if gate is not None:
        failed = gate.get("failed_rules", [])
        verdict = gate["verdict"]
        why = f" (failed: {html.escape(', '.join(failed))})" if failed else ""
        lines.append(
            f'<p class="verdict">Gate: <span class="{verdict}">{verdict.upper()}</span>{why}, '
            f"{gate['cohort']['cases']} synthetic cases.</p>"
        )
    arms = (downstream or {}).get("arms", {})
    if "real" in arms and "real+synthetic" in arms:
        real, syn = arms["real"]["summary"], arms["real+synthetic"]["summary"]
        eff = downstream.get("effect", {})
        seeds = len(arms["real"].get("runs", [])) or "?"
        rows = [
            f"<li>balanced accuracy {_delta(real['balanced_accuracy']['mean'], syn['balanced_accuracy']['mean'], eff.get('balanced_accuracy'))}</li>",
            f"<li>worst site {_delta(real['worst_site_balanced_accuracy']['mean'], syn['worst_site_balanced_accuracy']['mean'], eff.get('worst_site_balanced_accuracy'))}</li>",
        ]
        for rare in downstream.get("rare", []):
            key = f"recall_{rare}"
            rows.append(
                f"<li>{html.escape(rare)} (rare) recall "
                f"{_delta(real[key]['mean'], syn[key]['mean'], eff.get(key))}</li>"
            )
        per_site = real["per_site_balanced_accuracy"]
        rows.append(
            "<li>per site: "
            + "; ".join(
                f"{html.escape(s)} {_delta(per_site[s]['mean'], syn['per_site_balanced_accuracy'][s]['mean'], eff.get(f'site_{s}_balanced_accuracy'))}"
                for s in sorted(per_site)
            )
            + "</li>"
        )
        ungated = " (UNGATED cohort)" if downstream.get("ungated") else ""
        utility = downstream.get("utility")
        if utility is not None and utility.get("passed") is False:
            lines.append(
                '<p class="verdict">Utility rule: <span class="fail">FAIL</span>: adding the '
                "cohort made the classifier worse on the real <code>holdout</code> split, so the "
                "cohort is not to be used and the real-only classifier is the result. "
                f"{html.escape(utility['reason'])}</p>"
            )
        elif utility is not None and utility.get("passed"):
            lines.append(
                '<p>Utility rule: <span class="pass">pass</span> '
                f"({html.escape(utility['reason'].removeprefix('ok: '))}).</p>"
            )
        elif utility is not None:  # disabled, or no holdout scores to pair
            lines.append(f"<p>Utility rule: not judged ({html.escape(utility['reason'])}).</p>")
        lines.append(
            f"<p>Adding the synthetic cohort{ungated} changed the downstream classifier on the "
            f"real <code>test</code> split (real-only &rarr; real + synthetic, mean of {seeds} "
            f"seed(s)):</p><ul>{''.join(rows)}</ul>"
        )
    elif "real" in arms:
        lines.append(
            "<p>Only the real-only classifier ran (the cohort was not used): balanced accuracy "
            f"{arms['real']['summary']['balanced_accuracy']['mean']:.3f} on the real "
            "<code>test</code> split.</p>"
        )
    return f'<div class="headline">{"".join(lines)}</div>' if lines else ""


def federation_html(rounds: list[dict[str, Any]]) -> str:
    """What protected the sites in these rounds: secure aggregation, and the run's privacy
    account (the last noised release's epsilon covers every earlier one)."""
    trained = [r for r in rounds if r.get("sites")]
    if not trained:
        return ""
    notes = []
    if all("secure_aggregation" in r for r in trained):
        notes.append(
            "Every round ran Flower's SecAgg+: the server saw only the sum of the sites' "
            "masked updates, never one site's."
        )
    dp = [r["dp"] for r in trained if r.get("dp")]
    if dp:
        last = dp[-1]
        notes.append(
            f"Differential privacy: epsilon {last['epsilon']:.3g} at delta {last['delta']:g} "
            f"per site over {last['releases']} noised releases (noise multiplier "
            f"{last['noise_multiplier']:g}, clip {last['clipping_norm']:g})."
        )
    else:
        notes.append("No differential privacy: the trained weights carry no epsilon.")
    return "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)


def privacy_html(account: dict[str, Any]) -> str:
    """The run's privacy account per site (``synthct.privacy.run_account``), line by line."""
    from synthct.privacy import describe_account

    items = "".join(f"<li>{html.escape(line)}</li>" for line in describe_account(account))
    return f"<h3>Privacy account per site</h3><ul>{items}</ul>"


def _verdict_provenance_html(gate: dict[str, Any]) -> str:
    """Who signed the verdict, and every rule it was judged under that is not the default."""
    signature = gate.get("signature")
    lines = [
        f"Signed (Ed25519, key sha256 {signature['key_sha256'][:16]}...): "
        "downstream refuses the verdict if it or a file it names was changed."
        if signature
        else "Not signed: downstream can only check the files' hashes, not who judged them."
    ]
    for name, change in (gate.get("rules_changed") or {}).items():
        lines.append(
            f"Rule {name} changed from the default: threshold {change['default_threshold']:.4g} "
            f"-> {change['threshold']:.4g}, enabled {change['default_enabled']} -> "
            f"{change['enabled']}."
        )
    return "".join(f"<p class='note'>{html.escape(line)}</p>" for line in lines)


def _gate_html(gate: dict[str, Any]) -> str:
    verdict = gate["verdict"]
    rows = []
    for r in gate["rules"]:
        ci = "" if not r.get("ci") or None in r["ci"] else f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        sign = "&le;" if r["direction"] == "max" else "&ge;"
        result = {
            True: '<span class="pass">pass</span>',
            False: '<span class="fail">FAIL</span>',
            None: "-",
        }[r["passed"]]
        reason = html.escape(r["reason"].split("; ", 1)[-1])
        rows.append(
            f"<tr><td>{r['rule']}</td><td>{value}</td><td>{sign} {r['threshold']:.4g}</td>"
            f"<td>{ci}</td><td>{result}</td><td>{reason}</td></tr>"
        )
    flags = "".join(
        f"<li>{html.escape(f['path'])}: {html.escape('; '.join(f['reasons']))}</li>"
        for f in gate.get("flags", [])[:20]
    )
    return (
        f'<p class="verdict">Verdict: <span class="{verdict}">{verdict.upper()}</span> '
        f"({gate['cohort']['cases']} cases)</p>"
        + _verdict_provenance_html(gate)
        + "<table><tr><th>rule</th><th>value</th><th>threshold</th><th>CI</th><th>result</th>"
        f"<th>why this rule</th></tr>{''.join(rows)}</table>"
        + (f"<p>Flagged volumes:</p><ul>{flags}</ul>" if flags else "")
    )


def _harm_evidence(
    gate: dict[str, Any], calibration: dict[str, Any]
) -> tuple[str, list[tuple[Any, str]]]:
    """The calibration evidence: where this cohort's values sit among cohorts of known
    downstream effect, and the dose-response curves."""
    from synthct.report_harm import dose_response_figure, rule_harm_figure

    noise = calibration["noise"]
    provisional = " The noise band is provisional (one seed)." if noise["provisional"] else ""
    text = (
        "<h3>The gate against downstream harm</h3><p class='note'>Cohorts degraded along each "
        "axis the gate watches were added to real training data and judged on fresh phantoms "
        f"no model saw ({html.escape(calibration['judged_on'])}; seeds "
        f"{', '.join(map(str, noise['seeds']))}; {html.escape(calibration['source'])}). Harm "
        "means a headline number fell by more than the seed-noise band (balanced accuracy "
        f"{noise['band']['balanced_accuracy']:.3f}).{provisional} Privacy and per-site "
        "representation rules are not drawn: no downstream gain buys them.</p>"
    )
    figures = []
    rules = rule_harm_figure(calibration, gate["rules"])
    if rules is not None:
        figures.append((rules, "this cohort's rule values among cohorts of known effect"))
    points = [
        {**e, "change": e["change"]} for e in calibration["rows"] if e["axis"] != "near_copies"
    ]
    figures.append((dose_response_figure(points), "dose-response curves"))
    return text, figures


def _downstream_html(results: dict[str, Any]) -> str:
    rare = results.get("rare", [])
    head = "".join(
        f"<th>{h}</th>"
        for h in ("arm", "balanced acc", "macro AUC", *(f"{r} recall" for r in rare), "worst site")
    )
    rows = []
    for arm, data in results.get("arms", {}).items():
        s = data["summary"]

        def fmt(m: dict[str, float]) -> str:
            return f"{m['mean']:.3f} &plusmn; {m['sd']:.3f}"

        cells = [
            fmt(s["balanced_accuracy"]),
            fmt(s["macro_auc"]),
            *(fmt(s[f"recall_{r}"]) for r in rare),
            fmt(s["worst_site_balanced_accuracy"]),
        ]
        rows.append(f"<tr><td>{arm}</td>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    note = ""
    if results.get("ungated"):
        note = '<p class="fail">UNGATED cohort used (--force-ungated).</p>'
    return f"{note}<table><tr>{head}</tr>{''.join(rows)}</table>"


def _plugin_html(plugin: dict[str, Any]) -> str:
    """Plugin size against a full update, and what fusing it did: per class (reference
    classifier) and, for a late joiner, in its own scanner's style (radiomics KID)."""
    classes = list(plugin["base"]["per_class"])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    styled = "kid_radiomics_to_site" in plugin["base"]

    def row(arm: str) -> str:
        cells = "".join(
            f"<td>{plugin[arm]['per_class'].get(c, float('nan')):.2f}</td>" for c in classes
        )
        kid = f"<td>{plugin[arm]['kid_radiomics_to_site']:.3f}</td>" if styled else ""
        return f"<tr><td>{arm}</td><td>{plugin[arm]['mean']:.2f}</td>{cells}{kid}</tr>"

    who = html.escape(plugin["site"])
    joined = (
        f"{who} is a late joiner: it trained nothing of the shared generator, and its scanner "
        "is its own."
        if plugin.get("late_joiner")
        else f"{who} trained the shared generator with the others and adds a plugin after."
    )
    decoder = (
        f" and a rank-{plugin['decoder_rank']} adapter on the decoder (its scanner style)"
        if plugin.get("decoder_rank")
        else ""
    )
    kid_head = "<th>radiomics KID to its own scans</th>" if styled else ""
    return (
        f"<p>{joined} It trained a rank-{plugin['rank']} {html.escape(plugin['targets'])} "
        f"adapter on the frozen UNet ({plugin['steps']} steps){decoder}, "
        f"{plugin['train_s']:.0f} s in all, on its own <code>train</code> cases: "
        f"{plugin['plugin_bytes'] / 1e3:.0f} KB sent instead of a "
        f"{plugin['generator_update_bytes'] / 1e6:.1f} MB generator update "
        f"({plugin['share_of_generator_update']:.1%}). The registry validated it (hash, base "
        "generator, vocabulary, tensor shapes) and Fusion merged it. The base generator's "
        "cases (site-agnostic) against the same classes made for the site with the plugin "
        "fused in, 4 per class: conditional accuracy (reference classifier)"
        + (
            ", and the radiomics KID to the site's own holdout scans (lower: closer to its scanner)"
            if styled
            else ""
        )
        + f":</p><table><tr><th>generator</th><th>mean</th>{head}{kid_head}</tr>"
        f"{row('base')}{row('fusion')}</table>"
    )


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(data, dict):
        if set(data) == {"mean", "sd"}:
            return [(prefix, f"{data['mean']:.3f} &plusmn; {data['sd']:.3f}")]
        rows = []
        for k, v in data.items():
            rows += _flatten(v, f"{prefix} / {k}" if prefix else str(k))
        return rows
    if isinstance(data, float):
        return [(prefix, f"{data:.4g}")]
    if isinstance(data, list):
        return [(prefix, html.escape(", ".join(map(str, data))) or "-")]
    return [(prefix, html.escape(str(data)))]


def _summary_table(summary: dict[str, Any]) -> str:
    """The run's headline numbers, one row each (``a / b / c`` = nested keys)."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in _flatten(summary))
    return f"<table>{rows}</table>"


def write_report(
    out: str | Path,
    *,
    title: str,
    summary: dict[str, Any],
    synthetic: dict[str, np.ndarray],
    real: dict[str, np.ndarray] | None,
    rounds: list[dict[str, Any]],
    gate: dict[str, Any] | None,
    downstream: dict[str, Any] | None,
    provenance: dict[str, Any],
    plugin: dict[str, Any] | None = None,
    sites: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
    calibration: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
) -> Path:
    """Write the report. ``synthetic``/``real``: class -> N×X×Y×Z HU volumes (a few each);
    ``real`` is None when real images must not be shown; ``plugin``: the demo's site-plugin
    stage (sizes, conditional accuracy base vs fused, ``samples`` of the rare class);
    ``sites``: (real, synthetic) site -> one X×Y×Z HU volume each, for the style pairs;
    ``calibration``: the gate's calibration evidence (``synthct.eval.calibration``), drawn
    beside the gate table; ``privacy``: the run's account per site (``synthct.privacy``)."""
    images: list[str] = []
    parts = [f"<h1>{html.escape(title)}</h1><p class='note'>{time.strftime('%Y-%m-%d %H:%M')}</p>"]
    parts.append(_headline_html(gate, downstream))

    def add(uri: str | None, alt: str) -> None:
        if uri is not None:
            images.append(uri)
            parts.append(_img(uri, alt))

    def side_by_side(left: tuple[str, str] | None, right: tuple[str, str] | None) -> None:
        figures = []
        for uri, caption in (f for f in (left, right) if f is not None):
            images.append(uri)
            figures.append(
                f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                f"{_img(uri, caption)}</figure>"
            )
        parts.append(f'<div class="pair">{"".join(figures)}</div>')

    parts.append("<h2>Real and synthetic volumes, per class</h2>")
    if real is None:
        parts.append("<p class='note'>Real images are not shown (use --show-real).</p>")
    for name in dict.fromkeys([*synthetic, *(real or {})]):  # a class only one side has, too
        left = right = None
        if real is not None and name in real:
            left = (montage(real[name], ""), f"real: {name}")
        if name in synthetic:
            right = (montage(synthetic[name], ""), f"synthetic: {name}")
        side_by_side(left, right)
    if sites is not None and real is not None:
        parts.append("<h2>Scanner style: each site's scan beside a case made for it</h2>")
        add(site_pairs(*sites), "per-site style pairs")
    parts.append("<h2>HU histograms</h2>")
    add(hu_histograms(real or {}, synthetic), "HU histograms")
    parts.append("<h2>Federated training</h2>")
    parts.append(federation_html(rounds))
    if privacy is not None:
        parts.append(privacy_html(privacy))
    add(training_curves(rounds), "training curves")
    if gate is not None:
        parts.append("<h2>Gate: every rule</h2>" + _gate_html(gate))
        if calibration is not None:
            text, figures = _harm_evidence(gate, calibration)
            parts.append(text)
            for fig, alt in figures:
                add(png_uri(fig), alt)
    if downstream is not None:
        parts.append("<h2>Downstream classifiers (real test split)</h2>")
        if (
            gate is not None
            and gate["verdict"] != "pass"
            and "real+synthetic" not in downstream.get("arms", {})
        ):
            parts.append(
                "<p class='note'>The synthetic cohort failed the gate "
                f"({html.escape(', '.join(gate.get('failed_rules', [])))}), so it was not used: "
                "only the real-only arm ran. A failed gate is a result, not an error: the gate "
                "table says which evidence was missing.</p>"
            )
        parts.append(_downstream_html(downstream))
        add(downstream_bars(downstream), "downstream per site")
    if plugin is not None:
        parts.append("<h2>A site joins late: LoRA plugin</h2>" + _plugin_html(plugin))
        if plugin.get("samples") is not None:
            site = plugin["site"]
            if plugin.get("real_samples") is not None and real is not None:
                side_by_side(
                    (montage(plugin["real_samples"], ""), f"{site}'s own scans"),
                    (montage(plugin["base_samples"], ""), "base generator"),
                )
            add(
                montage(plugin["samples"], f"base + {site}'s plugin: {plugin['rare_class']}"),
                "plugin-fused samples",
            )
    prov = {**provenance, "versions": library_versions()}
    parts.append(
        "<h2>Details</h2><details><summary>All of the run's numbers</summary>"
        + _summary_table(summary)
        + "</details><details><summary>Provenance (config, hashes, versions)</summary><pre>"
        + html.escape(json.dumps(prov, indent=2, default=str))
        + "</pre></details>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body data-expected-images='{len(images)}'>{''.join(parts)}</body></html>"
    )
    out = Path(out)
    atomic_write_text(out, page)
    logger.info("report %s: %d pictures, %.1f kB", out, len(images), len(page) / 1024)
    return out
