"""Integrations with training frameworks: one module per framework, each importing its framework
only when it is itself imported (``pip install regdsl[hf]`` for ``regdsl.integrations.transformers``)."""
