"""vqgen: visual tokenizers and the autoregressive family of generators, in JAX/Flax.

The Python API (:mod:`vqgen.api`): ``vqgen.load_tokenizer(workdir)`` and
``vqgen.load_generator(workdir)``; ``vqgen.load_config(name)`` loads a config by name or path;
``vqgen.run(config, workdir, mode)`` runs a phase of the command line; ``vqgen.load_images(config)``
reads a config's data.
"""

__version__ = "0.1.0"

_API = ("load_tokenizer", "load_generator", "load_config_from_workdir", "load_images", "run", "Tokenizer",
        "Generator")


def __getattr__(name):  # the API pulls in JAX; `import vqgen` alone stays light
    if name in _API:
        from vqgen import api

        return getattr(api, name)
    if name == "load_config":
        from vqgen import config_lib

        return config_lib.load_config
    raise AttributeError(f"module 'vqgen' has no attribute {name!r}")
