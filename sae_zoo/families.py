"""Model families: what a :class:`~sae_zoo.SparseCoder` learns to write, and from what.

An **SAE** reconstructs its input; a **transcoder** writes a target from an input (an MLP's output from its
input), optionally with a linear skip term of the input. A family says what its batches hold and how they split
into ``(x, target, true_codes)``, what the data must pair, what it adds to the decoded output, which heads and
training options it refuses, and its on-disk keys. A new family (the cross-layer transcoder, next) is a registered
subclass in a file of its own::

    @register_family("my_family")
    class MyFamily(ModelFamily):
        paired = True
        def split(self, batch): ...

and ``SparseCoder(head, dictionary, family="my_family")`` or a recipe's ``model.family: my_family`` builds it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ._registry import Registry
from .data.base import Batch, Pair, split_batch
from .dictionary import Dictionary
from .encoders import EncoderHead

class ModelFamily:
    """A family of sparse coders (see the module's docstring). Every check does nothing by default."""

    #: the registry name (set by :func:`register_family`)
    name: ClassVar[str] = ""
    #: whether its batches pair each input with a target (:class:`~sae_zoo.data.Pair`), the target being what the
    #: model writes; otherwise the target is the input itself
    paired: ClassVar[bool] = False
    #: training options it refuses, and why (``{option: why}``); a recipe leaves them out of a head's defaults
    refuses: ClassVar[dict[str, str]] = {}
    #: the options it reads back from a saved config (:func:`family_from_config`)
    saved_keys: ClassVar[tuple[str, ...]] = ()

    def config(self) -> dict[str, Any]:
        """The family's keys in a saved model's config (:func:`family_from_config` reads them back)."""
        return {"family": self.name}

    def check(self, encoder: EncoderHead, dictionary: Dictionary, training: Any, scoring: Any = None) -> None:
        """Refuse, by name, a head, dictionary, training option or scoring this family cannot be built with."""
        for name, why in self.refuses.items():
            value = getattr(training, name, None)
            value = getattr(scoring, name, None) if value is None else value
            if isinstance(value, Tensor) or value:  # a tensor given, or an option that is on
                raise ValueError(f"a {self.name} cannot take {name}={value!r}: {why}")

    def skip_term(self, encoder: EncoderHead, dictionary: Dictionary) -> nn.Linear | None:
        """The model's linear map of the input added to its output, or None."""
        return None

    def split(self, batch: Batch, d_out: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, target, true_codes or None)`` of one batch, refused by name when it is not this family's;
        ``d_out``: the width the model writes."""
        if isinstance(batch, Pair):
            raise ValueError(f"a Pair(x, target) batch is a transcoder's; this model (the {self.name!r} family) "
                             "reconstructs its input (build it with family='transcoder' to learn the target)")
        return split_batch(batch)

    def check_data(self, datamodule: Any) -> None:
        """Refuse data this family cannot learn from, before it trains or is scored."""
        if datamodule.paired and not self.paired:
            where = datamodule.hparams.get("hook_out")  # (describe() may read the data: not before they are checked)
            raise ValueError(f"these data pair each input with a target at another hook ({where}), and this model (the "
                             f"{self.name!r} family) reconstructs its input: drop data.hook_out, or build a transcoder "
                             "(model.family: transcoder)")
        if self.paired and not datamodule.paired:
            raise ValueError(f"a {self.name} learns a target from an input (e.g. an MLP's output from its input), and "
                             "these data hold the inputs alone, so its output would be scored against its input: the "
                             "data must pair them (data.hook_out, the target's hook)")


#: the registered model families, by name
FAMILIES = Registry("model family", ModelFamily)


def register_family(name: str):
    """Class decorator: register a :class:`ModelFamily` under ``name`` (a recipe's ``model.family``)."""
    return FAMILIES.register(name, "register_family")


def list_families() -> list[str]:
    return FAMILIES.names()


def create_family(family: str | dict[str, Any] | ModelFamily | None = None, **options: Any) -> ModelFamily:
    """The family ``family`` (a registered name, ``{"name": ..., **options}``, or an object; None: an SAE), with
    ``options``."""
    if isinstance(family, ModelFamily):
        if options:
            raise TypeError(f"family {family.name!r} is already built; give its options when it is built, not "
                            f"{', '.join(options)}")
        return family
    spec = dict(family) if isinstance(family, dict) else {"name": family or "sae"}
    name = spec.pop("name", None)
    family_class = FAMILIES.get_class(name)
    try:
        return family_class(**spec, **options)
    except TypeError as e:
        raise TypeError(f"model family {name!r}: {e}") from None


def family_from_options(family: str | dict[str, Any] | ModelFamily | None = None, *, transcoder: bool | None = None,
                        skip_connection: bool | None = None, train_skip: bool | None = None,
                        default: str = "sae") -> ModelFamily:
    """The family ``family`` names, or that the keys recipes and saved models have always written give
    (``transcoder``, ``skip_connection``, ``train_skip``: read once, here), or ``default`` where neither says."""
    if family is None:
        family = "transcoder" if transcoder else "sae" if transcoder is False else default
    elif transcoder is not None:
        name = family.name if isinstance(family, ModelFamily) else family.get("name") if isinstance(family, dict) \
            else family
        if transcoder != (name == "transcoder"):
            raise ValueError(f"family={name!r} and transcoder={transcoder!r} disagree; give the family alone")
    options = {k: v for k, v in {"skip_connection": skip_connection, "train_skip": train_skip}.items() if v is not None}
    if isinstance(family, ModelFamily):
        if options:
            raise TypeError(f"family {family.name!r} is already built; give {', '.join(options)} when it is built")
        return family
    name = family.get("name") if isinstance(family, dict) else family
    if skip_connection and "skip_connection" not in getattr(FAMILIES.get(name), "saved_keys", ()):
        raise ValueError(f"skip_connection=True adds a linear map of the input to the output: a transcoder's "
                         f"(family='transcoder'), not an {name}'s")
    taken = getattr(FAMILIES.get(name), "saved_keys", ())
    return create_family(family, **{k: v for k, v in options.items() if k in taken})


def family_from_config(config: dict[str, Any]) -> ModelFamily:
    """The family of a saved model's config: its ``family`` key and that family's options, or a config written before
    families were named (``transcoder: true``, ``skip_connection``, ``train_skip``)."""
    name = config.get("family") or ("transcoder" if config.get("transcoder") else "sae")
    saved = FAMILIES[name].saved_keys if name in FAMILIES else ()
    return create_family(name, **{key: config[key] for key in saved if key in config})


@register_family("sae")
class Autoencoder(ModelFamily):
    """A sparse autoencoder: it reconstructs its input (``d_model`` in, ``d_model`` out)."""

    def config(self) -> dict[str, Any]:
        return {}  # an SAE's config names no family: every saved model before families were named is one

    def check(self, encoder: EncoderHead, dictionary: Dictionary, training: Any, scoring: Any = None) -> None:
        if encoder.d_model != dictionary.d_model:
            raise ValueError(f"encoder {encoder.name!r} reads d_model={encoder.d_model}, but the dictionary writes "
                             f"d_model={dictionary.d_model}; an SAE reconstructs its input (a transcoder, "
                             "family='transcoder', may write a width other than it reads)")


@register_family("transcoder")
class Transcoder(ModelFamily):
    """A transcoder: it writes a target (an MLP's output) from an input (that MLP's input), from :class:`Pair`
    batches. ``skip_connection`` adds a linear map of the raw input to the output (a skip-transcoder: zero at the
    start, as SAELens's; ``train_skip`` whether it trains). Only amortised heads apply: a head that finds codes by
    reconstructing its input through the dictionary would reconstruct the target, unknown at inference."""

    paired = True
    saved_keys: ClassVar[tuple[str, ...]] = ("skip_connection", "train_skip")
    refuses = {"supervised": "known-codes training needs the data's true codes",
               "true_dictionary": "a true dictionary scores atoms in the input's space",
               "tied_init": "a tied start copies the decoder into the encoder, which reads another space",
               "decoder_bias_init": "the decoder bias would start from the inputs, not the targets",
               "resample_every": "resampling points dead atoms at inputs, which lie in another space"}

    def __init__(self, skip_connection: bool = False, train_skip: bool = True) -> None:
        self.skip_connection, self.train_skip = bool(skip_connection), bool(train_skip)

    def config(self) -> dict[str, Any]:
        # the keys saved models have always had (a reader that predates families reads them)
        return {"transcoder": True, "skip_connection": self.skip_connection,
                **({"train_skip": self.train_skip} if self.skip_connection else {})}

    def check(self, encoder: EncoderHead, dictionary: Dictionary, training: Any, scoring: Any = None) -> None:
        if encoder.reads_dictionary:
            raise ValueError(f"encoder {encoder.name!r} cannot encode for a transcoder: it finds its codes by "
                             "reconstructing its input through the dictionary, and a transcoder's dictionary writes "
                             "the target, which is not known at inference. Use an amortised head (linear, topk, "
                             "batchtopk, jumprelu, mlp, residual_mlp)")
        if encoder.subtract_decoder_bias:
            raise ValueError(f"encoder {encoder.name!r} subtracts the decoder bias from its input, but a transcoder's "
                             "decoder bias lies in the target's space; set subtract_decoder_bias=False (SAELens's and "
                             "sparsify's transcoders do not subtract it)")
        super().check(encoder, dictionary, training, scoring)

    def skip_term(self, encoder: EncoderHead, dictionary: Dictionary) -> nn.Linear | None:
        if not self.skip_connection:
            return None
        skip = nn.Linear(encoder.d_model, dictionary.d_model, bias=False)
        nn.init.zeros_(skip.weight)
        return skip.requires_grad_(self.train_skip)

    def split(self, batch: Batch, d_out: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if not isinstance(batch, Pair):
            raise ValueError("a transcoder learns from Pair(x, target) batches: its data must pair each input with "
                             "its target")
        if batch.target.shape[-1] != d_out:
            raise ValueError(f"the batch's targets are {batch.target.shape[-1]} wide (shape "
                             f"{tuple(batch.target.shape)}), but this transcoder writes d_out={d_out} (its "
                             "dictionary's width)")
        return split_batch(batch)


def refused_recipe_keys(family: ModelFamily) -> dict[str, set[str]]:
    """The recipe keys (``{section: keys}``) ``family`` refuses: a head's recipe defaults leave them unset on it."""
    encoder = {"subtract_decoder_bias"} if family.paired else set()
    return {"encoder": encoder, "model": set(family.refuses)}
