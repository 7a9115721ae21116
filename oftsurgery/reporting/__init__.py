"""What oftsurgery tells the user and the Hub: console output, serving kernels, provenance, the model
card, the rotation summary and the plots. Below `merge`: the merge writes its card and provenance."""
