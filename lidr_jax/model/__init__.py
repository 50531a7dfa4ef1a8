"""The Llama-family decoder as pure functions over a params pytree, and its architecture config."""
