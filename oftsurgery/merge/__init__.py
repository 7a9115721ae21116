"""Merging OFT adapters into quantized checkpoints (see `merge_checkpoint`; the package map: docs/architecture.md)."""

from oftsurgery.merge.engine import merge_checkpoint
from oftsurgery.merge.options import METHODS, MergeOptions, parse_size
from oftsurgery.merge.report import LayerReport, MergeReport

__all__ = ["METHODS", "LayerReport", "MergeOptions", "MergeReport", "merge_checkpoint", "parse_size"]
