"""The aggregation rules, one module each. Importing this package registers them in the order of
_MODULES, which is the order of p2pfl.aggregation.RULES. A new rule: one module here, named below."""

from __future__ import annotations

from importlib import import_module

_MODULES = ("clipped", "mean", "weighted", "push_sum", "trimmed_mean", "median", "robust")

for _module in _MODULES:
    import_module(f"{__name__}.{_module}")
