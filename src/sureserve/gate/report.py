"""Gate results: one ``Check`` per test, gathered in a ``GateReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip"]


@dataclass
class Check:
    """One verdict with the numbers behind it and what to do about it."""

    name: str
    status: Status
    evidence: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "evidence": self.evidence,
                "fix": self.fix}


@dataclass
class GateReport:
    model: str
    tokenizer: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    #: True when the gate failed and the caller accepted the risk (accept_gate_failure)
    overridden: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def get(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "tokenizer": self.tokenizer, "passed": self.passed,
                "overridden": self.overridden, "seconds": round(self.seconds, 3),
                "checks": [c.to_dict() for c in self.checks]}

    def render(self, console: Any) -> None:
        """The gate's table (check, status, evidence and fix) and its summary line."""
        from rich.table import Table

        colour = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
        t = Table("check", "status", "evidence / fix", show_lines=True,
                  title=f"gate: {self.model} with tokenizer {self.tokenizer}")
        for c in self.checks:
            fix = f"\n[bold]fix:[/] {c.fix}" if c.fix and c.status != "pass" else ""
            t.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.evidence + fix)
        console.print(t)
        console.print(self.summary(), highlight=False)

    def summary(self) -> str:
        if self.passed:
            return f"gate passed ({len(self.checks)} checks, {self.seconds:.2f}s)"
        names = ", ".join(c.name for c in self.failures)
        return f"gate FAILED: {names}"
