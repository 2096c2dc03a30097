"""meminject's built-in plugins: what ships with meminject, registered like any plugin.

Built-ins are plugins like any other (the ``llm`` way, ``llm/default_plugins/``): each
module here implements the same ``@hookimpl`` hooks an installed plugin does
(:mod:`meminject.hookspecs`), goes into the same registry, and is listed by
``meminject plugins`` as built-in (``meminject.default_plugins.encoders (built-in)``).
They are the reference implementations of the hooks, too. The core modules keep the
API the hooks and their users rely on (the ``Strategy`` base class, ``PromptRow``, the
``Backend`` protocol, ``load_model``); this package only registers into it.

* :mod:`~meminject.default_plugins.encoders`: the encoders ``unembed``, ``embed`` and
  ``layer`` (``register_encoders``);
* :mod:`~meminject.default_plugins.strategies`: the strategies ``add`` and ``gated``
  (``register_strategies``);
* :mod:`~meminject.default_plugins.models`: the model ``toyworld`` and the real model
  sources of :mod:`meminject.model_sources` (``register_models``);
* :mod:`~meminject.default_plugins.datasets`: the dataset loaders ``csv`` and
  ``toyworld`` (``register_datasets``);
* :mod:`~meminject.default_plugins.backends`: the backends ``hf`` and ``bridge``
  (``register_backends``).

:data:`meminject.plugins.BUILTIN_MODULES` lists these modules, in the order they
register. Importing any of them is cheap: torch and transformer_lens load only when an
encoder, strategy, loader or backend factory runs.
"""
