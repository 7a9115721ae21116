"""oftsurgery: OFT adapters on GPTQ/AWQ quantized checkpoints — attach, extract, merge, verify, push.

Heavy dependencies (torch, gptqmodel, transformers) are imported only by the functions that need
them, so `import oftsurgery` and `oftsurgery --help` stay fast.
"""

__version__ = "0.1.0"
