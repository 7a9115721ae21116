"""How faithful a model is: perplexity of base / attached / merged on held-out text (`evaluate.py`),
and a gptqmodel-loaded model computed in float32 on CPU (`cpu_float.py`)."""
