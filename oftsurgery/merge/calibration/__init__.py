"""What the linears see: calibration text, the layer runner, the model skeleton, the input statistics."""
