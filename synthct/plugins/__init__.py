"""Site plugins: asynchronous LoRA contributions to the shared generator (see ``adapter``,
``registry`` and ``merge``)."""
