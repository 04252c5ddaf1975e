"""The gate: static checks and probes that a model must pass before it is served."""

from sureserve.gate.report import Check, GateReport
from sureserve.gate.run import run_gate

__all__ = ["Check", "GateReport", "run_gate"]
