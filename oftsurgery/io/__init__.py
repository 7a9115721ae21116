"""Checkpoint I/O: everything that touches files of a Hugging Face checkpoint lives here.

The rest of oftsurgery works on tensors by name: `CheckpointReader` streams them out of one file or
many shards, `CheckpointWriter` streams them into shards and writes the index, and `atomic_output`
makes sure an output directory only ever appears complete.
"""

from oftsurgery.io.atomic import atomic_output, check_output_path
from oftsurgery.io.ownership import MERGE_REPORT
from oftsurgery.io.reader import CheckpointReader
from oftsurgery.io.writer import CheckpointWriter, copy_side_files

__all__ = ["MERGE_REPORT", "CheckpointReader", "CheckpointWriter", "atomic_output", "check_output_path",
           "copy_side_files"]
