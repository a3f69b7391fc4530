"""Turn a run's ``structure_probes.jsonl`` into PNG figures.

``python -m hf_cblr.diagnostics.plot RUN_DIR_OR_JSONL [--out DIR]`` writes

- ``totals.png``: gradient norms (training and probe), update length, probe-loss change (with its
  first-order prediction ``<g, dw>``) and curvature along the update, against the step;
- ``layers_<metric>.png``: a layer x step heatmap of log10 of each per-layer metric in the log:
  ``grad_norm``, ``update_norm``, and for this package's optimizers ``curvature`` and ``lr``.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by Agg, without pyplot's global state.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hf_cblr.diagnostics.probes import PROBES_FILE, read_json_lines

#: Per-layer metrics drawn as heatmaps: (title, colour-bar label).
LAYER_METRICS: dict[str, tuple[str, str]] = {
    "grad_norm": ("Per-layer gradient norm (after clipping)", "log10 |g_l|"),
    "update_norm": ("Per-layer parameter-update step length", "log10 |Δw_l|"),
    "curvature": ("Per-layer curvature (the optimizer's smoothed estimate)", "log10 c_l"),
    "lr": ("Per-layer learning rate", "log10 lr·r_l"),
}
_MAX_LAYER_LABELS = 60


def load_probes(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``structure_probes.jsonl`` file, in step order."""
    return sorted(read_json_lines(Path(jsonl_path)), key=lambda record: record["step"])


def plot_probes(jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the figures of ``jsonl_path`` (a probes file or the run directory holding it) into ``out_dir``.

    Returns the paths of the PNG files written. Raises ``ValueError`` when the file has no record.
    """
    path = Path(jsonl_path)
    if path.is_dir():
        path = path / PROBES_FILE
    records = load_probes(path)
    if not records:
        raise ValueError(f"{path} holds no probe records")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(_totals_figure(records), out / "totals.png")]
    layer_names = list(dict.fromkeys(name for record in records for name in record["layers"]))
    for metric, (title, label) in LAYER_METRICS.items():
        values = _layer_matrix(records, layer_names, metric)
        if np.isfinite(values).any():
            written.append(_save(_heatmap_figure(values, records, layer_names, title, label), out / f"layers_{metric}.png"))
    return written


def _line(ax: Axes, records: Sequence[dict[str, Any]], key: str, label: str, *, positive_only: bool = False) -> None:
    """Plot a total metric against the step, where it is recorded (and positive, for log axes)."""
    points = [(record["step"], record["total"].get(key)) for record in records]
    points = [(step, value) for step, value in points if value is not None and (value > 0 or not positive_only)]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", markersize=3, label=label)


def _totals_figure(records: Sequence[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    ax = axes[0, 0]
    _line(ax, records, "grad_norm", "training gradient |g| (after clipping)", positive_only=True)
    _line(ax, records, "probe_grad_norm", "probe-batch gradient |g_B|", positive_only=True)
    ax.set(yscale="log", ylabel="norm", title="Gradient norm")
    ax = axes[0, 1]
    _line(ax, records, "update_norm", "|Δw|", positive_only=True)
    ax.set(yscale="log", ylabel="|Δw|", title="Parameter-update step length")
    ax = axes[1, 0]
    _line(ax, records, "loss_change", "ΔL = L(w + Δw) − L(w)")
    _line(ax, records, "grad_dot_update", "first-order prediction ⟨g_B, Δw⟩")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="loss change", title="Loss-update step on the probe batch")
    ax = axes[1, 1]
    _line(ax, records, "curvature", "2(ΔL − ⟨g_B, Δw⟩) / |Δw|²")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="curvature", title="Curvature along the update (secant)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle("Structure probes: totals over all layers")
    return fig


def _layer_matrix(records: Sequence[dict[str, Any]], layer_names: Sequence[str], metric: str) -> np.ndarray:
    """log10 of ``metric`` as a (layer, probe step) array; NaN where missing or not positive."""
    values = np.full((len(layer_names), len(records)), np.nan)
    for j, record in enumerate(records):
        for i, name in enumerate(layer_names):
            value = record["layers"].get(name, {}).get(metric)
            if value is not None and value > 0 and math.isfinite(value):
                values[i, j] = math.log10(value)
    return values


def _heatmap_figure(values: np.ndarray, records: Sequence[dict[str, Any]], layer_names: Sequence[str], title: str,
                    label: str) -> Figure:
    n_layers, n_steps = values.shape
    fig = Figure(figsize=(max(6.0, 0.25 * n_steps + 4.0), min(40.0, 2.0 + 0.16 * min(n_layers, 240))), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label=label)
    every = max(1, math.ceil(n_layers / _MAX_LAYER_LABELS))
    ax.set_yticks(range(0, n_layers, every), [layer_names[i] for i in range(0, n_layers, every)], fontsize=6)
    steps = [record["step"] for record in records]
    every = max(1, math.ceil(n_steps / 20))
    ax.set_xticks(range(0, n_steps, every), [str(steps[j]) for j in range(0, n_steps, every)])
    ax.set(xlabel="optimizer step", ylabel="layer (parameter)", title=title)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m hf_cblr.diagnostics.plot", description=__doc__.splitlines()[0])
    parser.add_argument("path", help=f"a run's output directory (holding {PROBES_FILE}) or the .jsonl file")
    parser.add_argument("--out", help="where the PNG files go (default: <run dir>/probe_plots)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "probe_plots"
    written = plot_probes(path, out)
    for file in written:
        print(file)
    return written


if __name__ == "__main__":
    main()
