"""Share and reuse models, above the model itself.

* ``SparseCoder.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``: sae_zoo's own format
  (``config.json`` + ``model.safetensors`` + a model card), written by :mod:`sae_zoo.pretrained`.
* :func:`push_model`: save, then create the repo and branch and upload in one commit.
* :func:`load_sae`: SAEs and transcoders saved by SAELens, sparsify, dictionary_learning, Gemma Scope and
  circuit-tracer as a pretrained :class:`~sae_zoo.Dictionary` (and the head registered for their architecture);
  :func:`export_saelens` writes SAELens's format, :func:`export_circuit_tracer` circuit-tracer's per-layer one;
  cross-layer transcoders (circuit-tracer's, Gemma Scope 2's) load whole, and :func:`export_circuit_tracer_clt`
  writes circuit-tracer's CLT folder.
* :func:`list_pretrained`: the catalogue of public SAEs ``load_sae("release/sae_id")`` reads by name.
* :func:`load_run`, :func:`write_card`, :func:`push_run`: run directories written by ``sae-zoo fit``.
"""

from ..pretrained import load_encoder, model_card
from .catalogue import list_pretrained
from .circuit_tracer import export_circuit_tracer
from .clt import PretrainedCLT, export_circuit_tracer_clt
from .formats import FORMAT_FILES, PretrainedSAE, export_saelens, load_sae
from .run import load_run, push_run, write_card
from .transport import push_model

__all__ = ["FORMAT_FILES", "PretrainedCLT", "PretrainedSAE", "export_circuit_tracer", "export_circuit_tracer_clt", "export_saelens", "list_pretrained",
           "load_encoder", "load_run", "load_sae",
           "model_card", "push_model", "push_run", "write_card"]
