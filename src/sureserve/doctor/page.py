"""``sureserve doctor --html FILE``: one self-contained page (inline CSS and SVG, no script,
no external URL) with the findings table and small charts where a picture reads faster."""

from __future__ import annotations

import html
import math
from typing import Any

from sureserve.doctor.report import DoctorReport

W, H, PAD = 420, 160, 28
COLOURS = ("#3465a4", "#cc0000", "#73d216", "#f57900", "#75507b", "#c4a000", "#555753")
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:6px;
vertical-align:top;text-align:left}td.evidence{white-space:pre-wrap;font-family:monospace;
font-size:12px}.pass{color:#2e7d32}.warn{color:#b26a00}.fail{color:#c62828;font-weight:bold}
.skip{color:#888}figure{display:inline-block;margin:1em 1em 0 0}figcaption{font-size:13px}
svg text{font-size:10px}
"""


def render(report: DoctorReport) -> str:
    target = " and ".join(x for x in (report.model, report.url) if x)
    rows = "".join(
        f"<tr><td>{_e(f.symptom)}</td><td>{_e(f.checked)}</td>"
        f"<td class=evidence>{_e(f.evidence)}</td><td class={f.verdict}>{f.verdict}</td>"
        f"<td>{_e(f.fix) if f.verdict in ('warn', 'fail') else ''}</td></tr>"
        for f in report.findings)
    charts = _charts(report.charts)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>sureserve doctor: {_e(target)}</title><style>{STYLE}</style></head><body>"
            f"<h1>sureserve doctor: {_e(target)}</h1>"
            f"<p>{'FAILED' if report.failed else 'nothing failed'}: "
            + ", ".join(f"{sum(f.verdict == v for f in report.findings)} {v}"
                        for v in ("pass", "warn", "fail", "skip")) + "</p>"
            "<table><thead><tr><th>symptom</th><th>checked</th><th>evidence</th>"
            f"<th>verdict</th><th>fix</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<h2>Charts</h2>{charts}" if charts else
               "<p>Charts come from a running server: add --url.</p>")
            + "</body></html>\n")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _charts(c: dict[str, Any]) -> str:
    parts = []
    for key, title in (("latency", "Request latency (s)"), ("queue_time", "Queue time (s)")):
        if any(n for _, n in c.get(key, [])):
            parts.append(_figure(title, _bars([(_le(le), n) for le, n in c[key]])))
    for model, mix in (c.get("label_mix") or {}).items():
        labels = sorted(set(mix.get("window", {})) | set(mix.get("baseline", {})))
        groups = [(lab, [mix.get("baseline", {}).get(lab, 0.0), mix.get("window", {})
                         .get(lab, 0.0)]) for lab in labels]
        parts.append(_figure(f"{model}: label mix, baseline (blue) vs window (red)",
                             _grouped(groups)))
    for model, history in (c.get("drift_history") or {}).items():
        if len(history) >= 2:
            parts.append(_figure(f"{model}: drift scores over time", _lines(history)))
    return "".join(parts)


def _le(le: float) -> str:
    return "+Inf" if math.isinf(le) else f"{le:g}"


def _figure(title: str, svg: str) -> str:
    return f"<figure>{svg}<figcaption>{_e(title)}</figcaption></figure>"


def _svg(body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + PAD}" '
            f'role="img">{body}</svg>')


def _bars(items: list[tuple[str, float]]) -> str:
    top = max((v for _, v in items), default=0) or 1
    step = (W - PAD) / max(len(items), 1)
    body = []
    for k, (label, v) in enumerate(items):
        h = (H - PAD) * v / top
        x = PAD + k * step
        body.append(f'<rect x="{x:.1f}" y="{H - h:.1f}" width="{step * 0.8:.1f}" '
                    f'height="{h:.1f}" fill="{COLOURS[0]}"><title>{_e(label)}: {v:g}'
                    f'</title></rect><text x="{x:.1f}" y="{H + 12}">{_e(label)}</text>')
    body.append(f'<text x="0" y="10">{top:g}</text>')
    return _svg("".join(body))


def _grouped(groups: list[tuple[str, list[float]]]) -> str:
    step = (W - PAD) / max(len(groups), 1)
    body = []
    for k, (label, values) in enumerate(groups):
        for j, v in enumerate(values):
            h = (H - PAD) * v
            x = PAD + k * step + j * step * 0.4
            body.append(f'<rect x="{x:.1f}" y="{H - h:.1f}" width="{step * 0.38:.1f}" '
                        f'height="{h:.1f}" fill="{COLOURS[j]}"><title>{_e(label)}: {v:.1%}'
                        f'</title></rect>')
        body.append(f'<text x="{PAD + k * step:.1f}" y="{H + 12}">{_e(label)}</text>')
    body.append('<text x="0" y="10">100%</text>')
    return _svg("".join(body))


def _lines(history: list[dict[str, Any]]) -> str:
    t0, t1 = history[0]["time"], history[-1]["time"]
    names = sorted({n for h in history for n in h["scores"]})
    top = max((v for h in history for v in h["scores"].values() if v is not None),
              default=0) or 1
    body = []
    for j, name in enumerate(names):
        pts = [(PAD + (W - PAD) * (h["time"] - t0) / max(t1 - t0, 1e-9),
                H - (H - PAD) * h["scores"][name] / top)
               for h in history if h["scores"].get(name) is not None]
        if pts:
            colour = COLOURS[j % len(COLOURS)]
            body.append(f'<polyline fill="none" stroke="{colour}" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                        + f'"><title>{_e(name)}</title></polyline>'
                        f'<text x="{W - 90}" y="{12 + 11 * j}" fill="{colour}">{_e(name)}'
                        "</text>")
    body.append(f'<text x="0" y="10">{top:.3g}</text><text x="{PAD}" y="{H + 12}">'
                f"{(t1 - t0) / 60:.1f} min</text>")
    return _svg("".join(body))
