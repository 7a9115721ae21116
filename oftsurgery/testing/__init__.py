"""Test helpers that ship with the package, so that the demo and users can use them outside pytest.

`hub_server.LocalHub` is a small Hugging Face Hub stand-in on 127.0.0.1; `models` builds tiny and
SmolLM2 checkpoints offline; `synthetic` builds checkpoints of real model shapes. Production code
(everything but the demo) never imports this package (tests/test_layout.py).
"""
