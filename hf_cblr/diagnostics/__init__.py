"""Diagnostics for training runs: the paper's structure probes as a Trainer callback, their plots, and the optimizer's
per-layer rate and curvature in the Trainer's logs."""

from hf_cblr.diagnostics.layer_stats import LayerStatsCallback, optimizer_layer_stats
from hf_cblr.diagnostics.plot import load_probes, plot_probes
from hf_cblr.diagnostics.probes import PROBES_FILE, StructureProbeCallback, model_loss

__all__ = ["PROBES_FILE", "LayerStatsCallback", "StructureProbeCallback", "load_probes", "model_loss",
           "optimizer_layer_stats", "plot_probes"]
