"""Loading: source resolution → load plan → tokenizer + model."""

from sureserve.loading.loader import Loaded, load
from sureserve.loading.plan import DeviceCaps, LoadPlan, make_plan
from sureserve.loading.source import Source, resolve

__all__ = ["DeviceCaps", "LoadPlan", "Loaded", "Source", "load", "make_plan", "resolve"]
