"""The quantization codec: unpack GPTQ/AWQ layers into integer codes on a grid, requantize, pack back.

Import from the submodules (`grid`, `gptq`, `awq`, `codec`, `config`); this package imports nothing
heavy on its own so that `oftsurgery --help` stays fast.
"""
