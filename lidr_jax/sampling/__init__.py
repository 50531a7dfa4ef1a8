"""Text generation: the prefill + decode engine and the sampling rules."""
