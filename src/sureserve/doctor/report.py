"""What ``sureserve doctor`` prints: one finding per symptom of the debug guide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["pass", "warn", "fail", "skip"]
RANK = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
COLOUR = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


@dataclass
class Finding:
    """One row: the symptom a user reports, what was checked, the numbers, the verdict and
    what to do."""

    symptom: str
    checked: str
    evidence: str
    verdict: Verdict
    fix: str = ""
    #: the figures the verdict was decided on, by name (so a reader, or a test on any
    #: machine, can tell the verdict follows from what this machine measured)
    measured: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"symptom": self.symptom, "checked": self.checked, "evidence": self.evidence,
                "verdict": self.verdict, "fix": self.fix, "measured": dict(self.measured)}


def worst(verdicts: list[Verdict]) -> Verdict:
    return max(verdicts, key=RANK.__getitem__, default="pass")


@dataclass
class DoctorReport:
    model: str | None
    url: str | None
    findings: list[Finding] = field(default_factory=list)
    #: what the HTML page draws (histograms, label mix, drift history), from --url
    charts: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(f.verdict == "fail" for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "url": self.url, "failed": self.failed,
                "findings": [f.to_dict() for f in self.findings], "charts": self.charts}

    def render(self, console: Any) -> None:
        from rich.table import Table

        target = " and ".join(x for x in (self.model, self.url) if x)
        t = Table("symptom", "checked", "evidence", "verdict", "fix", show_lines=True,
                  title=f"sureserve doctor: {target}")
        for f in self.findings:
            t.add_row(f.symptom, f.checked, f.evidence,
                      f"[{COLOUR[f.verdict]}]{f.verdict}[/]",
                      f.fix if f.verdict in ("warn", "fail") else "")
        console.print(t)
        counts = {v: sum(f.verdict == v for f in self.findings) for v in RANK}
        console.print(", ".join(f"{n} {v}" for v, n in counts.items() if n), highlight=False)
