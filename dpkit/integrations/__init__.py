"""Optional adapters to the libraries users come from (Hugging Face transformers, peft).

Nothing here is imported by ``import dpkit``. :mod:`dpkit.integrations.transformers` registers its
layer rules when the user has imported ``transformers`` (see :mod:`dpkit.grad_sample.registry`).
"""
