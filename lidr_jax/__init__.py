"""lidr_jax: multilingual self-improvement of LLMs (LIDR and ICR iterative DPO) in pure JAX.

Public surface (see docs/design.md):

    from lidr_jax import load_pretrained, forward, generate, SamplingConfig, export_hf
    model = load_pretrained("smollm2-135m-instruct")   # HF dir, .gguf file, or an embedded name
    logits = forward(model.params, tokens_BT, model.config)
    outs = generate(model, [[{"role": "user", "content": "Bonjour !"}]], SamplingConfig(max_new_tokens=32))
    export_hf(model, "out/hf")

Names are imported lazily so `import lidr_jax` stays cheap (no JAX initialisation until used).
"""

import importlib

from lidr_jax.parallel.topology import skip_absent_tpu

skip_absent_tpu()  # before JAX starts: no TPU probe on machines without one (its docstring says why)

__version__ = "0.1.0"

_EXPORTS = {
    "load_pretrained": "lidr_jax.formats.load",
    "Model": "lidr_jax.formats.load",
    "forward": "lidr_jax.model.llama",
    "ModelConfig": "lidr_jax.model.config",
    "generate": "lidr_jax.sampling.sampler",
    "SamplingConfig": "lidr_jax.sampling.sampler",
    "export_hf": "lidr_jax.formats.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lidr_jax' has no attribute {name!r}")
