"""Share and reuse models.

* ``SparseCoder.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``: sae_zoo's own format
  (``config.json`` + ``model.safetensors`` + a model card), on disk or on the Hugging Face Hub.
* :func:`load_encoder`: a saved model's encoder head alone, to pair with another dictionary.
* :func:`load_sae`: SAEs saved by SAELens, sparsify and dictionary_learning as a pretrained
  :class:`~sae_zoo.Dictionary` (and the matching head); :func:`export_saelens` writes SAELens's format.
* :func:`model_card` and :func:`load_run`: model cards, and the model, recipe and metrics of a run
  directory written by ``sae-zoo fit``.
"""

from .card import model_card
from .formats import FORMAT_FILES, PretrainedSAE, export_saelens, load_sae
from .run import load_run, push_run, write_card
from .serialization import load_encoder

__all__ = ["FORMAT_FILES", "PretrainedSAE", "export_saelens", "load_encoder", "load_run", "load_sae", "model_card",
           "push_run", "write_card"]
