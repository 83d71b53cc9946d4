"""Accuracy against kept fraction: a sweep over one method option, and its curves.

``--sweep budget=0.05,0.15,0.3`` evaluates every method of ``--methods`` but the
reference once per value, as ``<spec>+budget=<value>``; the reference (``full``) runs once.
Every point is an ordinary method of the run, in ``predictions.jsonl`` and ``metrics.json``.
The curves are drawn from the metrics alone, so a finished run gives them again without a
model: ``curves.json`` holds, per swept method, one point per value (mean kept fraction,
F1 and contains, and their paired differences from full with bootstrap intervals), and
``curves.png`` plots the differences against the kept fraction (matplotlib, the ``plot``
extra).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkv_integrations.eval.metrics import BOOTSTRAP
from samkv_integrations.eval.rundir import write_atomic
from samkv_integrations.methods.specs import REFERENCE, parse_spec

__all__ = ["CURVES_JSON", "CURVES_PNG", "Sweep", "draw_curves", "require_matplotlib"]

CURVES_JSON, CURVES_PNG = "curves.json", "curves.png"

#: The scores plotted, as ``(metrics key, axis title)``.
_PANELS = (("f1", "F1"), ("contains_gold", "contains"))


@dataclass(slots=True, frozen=True)
class Sweep:
    """One method option and the values it takes: ``option=v1,v2,...``.

    Attributes:
        option: The option (a field of every swept method).
        values: Its values, as written (read as a spec reads them).
    """

    option: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """Parse ``option=v1,v2,...``.

        Raises:
            ValueError: No option, no value, an empty or repeated value; the message says which.
        """
        option, sep, raw = text.partition("=")
        values = tuple(v.strip() for v in raw.split(","))
        if not sep or not option.strip() or not raw.strip():
            raise ValueError(f"sweep: {text!r} is not option=value[,value...]")
        if any(not v or "+" in v for v in values):
            raise ValueError(f"sweep: {text!r} has an empty value or a '+' in one")
        if len(set(values)) != len(values):
            raise ValueError(f"sweep: {text!r} repeats a value")
        return cls(option.strip(), values)

    def series(self, methods: str | Sequence[str]) -> dict[str, list[str]]:
        """Per swept method spec, the spec of each point, in value order.

        Raises:
            ValueError: A spec already sets the option; one lacking it fails when parsed.
        """
        series = {}
        for label in _labels(methods):
            spec = parse_spec(label)
            if spec.name == REFERENCE:
                continue
            if self.option in spec.all_options:
                raise ValueError(f"sweep: {label!r} already sets {self.option!r}")
            series[label] = [f"{label}+{self.option}={value}" for value in self.values]
        if not series:
            raise ValueError(f"sweep: no method but {REFERENCE!r} to sweep {self.option!r} over")
        return series

    def expand(self, methods: str | Sequence[str]) -> list[str]:
        """The specs to run: the reference where given, then every point of every series."""
        reference = [label for label in _labels(methods) if parse_spec(label).name == REFERENCE]
        return reference + [p for points in self.series(methods).values() for p in points]


def _labels(methods: str | Sequence[str]) -> list[str]:
    """The specs of ``--methods`` (comma-separated strings)."""
    items = [methods] if isinstance(methods, str) else list(methods)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def require_matplotlib() -> None:
    """Raise ``ValueError`` with the way out unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "sweep: drawing curves.png needs matplotlib; pip install 'samkv-integrations[plot]'"
        ) from e


def curves(metrics: dict[str, Any], sweep: Sweep, methods: str | Sequence[str]) -> dict[str, Any]:
    """The curves of a finished run's ``metrics`` (``metrics.json``), as ``curves.json`` holds them."""
    summary = metrics["methods"]
    reference = next(label for label in summary if parse_spec(label).name == REFERENCE)
    keys = ("n", "kept_fraction", "f1", "contains_gold")
    series = {
        base: [
            {
                "value": parse_spec(label).all_options[sweep.option],
                "label": label,
                **{key: summary[label][key] for key in keys},
                **{
                    f"{key}_vs_full": (summary[label]["vs_full"] or {}).get(key)
                    for key, _ in _PANELS
                },
            }
            for label in labels
        ]
        for base, labels in sweep.series(methods).items()
    }
    return {
        "option": sweep.option,
        "values": list(sweep.values),
        "reference": {"label": reference, **{key: summary[reference][key] for key in keys}},
        "bootstrap": metrics.get("bootstrap", BOOTSTRAP),
        "methods": series,
    }


def wrap_spec(label: str, width: int = 32) -> str:
    """``label`` broken before its ``+options`` into lines of about ``width`` characters.

    A long method spec in one line would run the legend out of the figure.
    """
    lines = [""]
    for i, part in enumerate(label.split("+")):
        piece = part if i == 0 else "+" + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def draw_curves(
    run_dir: Path, metrics: dict[str, Any], sweep: Sweep, methods: str | Sequence[str]
) -> tuple[Path, Path]:
    """Write ``curves.json`` and ``curves.png`` into ``run_dir``; return their paths."""
    require_matplotlib()
    from matplotlib.figure import Figure

    data = curves(metrics, sweep, methods)
    json_path, png_path = run_dir / CURVES_JSON, run_dir / CURVES_PNG
    write_atomic(json_path, json.dumps(data, indent=2) + "\n")
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    reference = data["reference"]
    for axes, (key, title) in zip(figure.subplots(1, 2), _PANELS, strict=True):
        full_value = reference[key]
        full_text = "-" if full_value is None else f"{full_value:.3f}"
        axes.axhline(0.0, color="black", linewidth=1, label=f"{reference['label']} ({full_text})")
        for base, points in data["methods"].items():
            shown = [p for p in points if p[f"{key}_vs_full"] is not None]
            x = [p["kept_fraction"] for p in shown]
            y = [p[f"{key}_vs_full"]["diff"] for p in shown]
            error = [
                [p[f"{key}_vs_full"]["diff"] - p[f"{key}_vs_full"]["low"] for p in shown],
                [p[f"{key}_vs_full"]["high"] - p[f"{key}_vs_full"]["diff"] for p in shown],
            ]
            axes.errorbar(x, y, yerr=error, marker="o", capsize=3, label=wrap_spec(base))
        level = round(100 * float(data["bootstrap"]["level"]))
        axes.set_xlabel("kept fraction of the context")
        axes.set_ylabel(f"{title} - {reference['label']} (paired, {level}% bootstrap CI)")
        axes.set_title(f"{title} against kept fraction ({sweep.option} swept)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(png_path, dpi=120)
    return json_path, png_path
