"""`oftsurgery demo`: the whole job on a real model, offline, in one call (`run_demo`).

`run.py` holds the steps and their reuse between runs; `train.py` the short OFT fine-tune they use.
"""

from oftsurgery.demo.run import run_demo

__all__ = ["run_demo"]
