"""sae_zoo's own saved format, below the model that writes it: ``config.json`` (what rebuilds the model),
``model.safetensors`` (its weights) and ``README.md`` (its model card), in a local folder or a Hub repo.

:class:`~sae_zoo.SparseCoder`'s ``save_pretrained``/``from_pretrained`` use it; :mod:`sae_zoo.hub` adds
other libraries' formats, pushing, and run directories on top.
"""

from .card import model_card
from .config import CONFIG_NAME, WEIGHTS_NAME, load_encoder, model_config
from .files import list_files, resolve_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "list_files", "load_encoder", "model_card", "model_config", "resolve_file"]
