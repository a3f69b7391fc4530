"""Diagnostics for training runs: the paper's structure probes as a Trainer callback, and their plots."""

from hf_cblr.diagnostics.plot import load_probes, plot_probes
from hf_cblr.diagnostics.probes import PROBES_FILE, StructureProbeCallback, model_loss

__all__ = ["PROBES_FILE", "StructureProbeCallback", "load_probes", "model_loss", "plot_probes"]
