"""DPO training: losses, the trainer loop, preference-pair datasets, Orbax checkpoints, `python -m lidr_jax.dpo`."""
