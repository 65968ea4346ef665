"""How a :class:`~sae_zoo.SparseCoder` trains, as one object: the objective's options, the sparsity control, the
start, the field's aids and any further ones. The model itself holds structure only (head, dictionary, skip term);
``SparseCoder(head, dictionary, TrainingConfig(lr=3e-3, target_l0=8))``, or the same options written flat
(``SparseCoder(head, dictionary, lr=3e-3, target_l0=8)``, as recipes and saved checkpoints write them), which are
read into this object once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .reconstruction import Matryoshka, MeanSquaredError, ReconstructionTerm, create_reconstruction
from .schedules import steps_or_fraction
from .training import TrainingAid


@dataclass
class TrainingConfig:
    """A SparseCoder's training method (see :class:`~sae_zoo.SparseCoder` for what each option does).

    * the objective: ``l1_coeff`` (the sparsity penalty's coefficient), ``supervised`` (known codes: a per-latent
      cosine to the true codes instead), ``sparse_decode`` (a top-k head decodes from its k atoms),
      ``reconstruction`` (the reconstruction term: a registered name or ``{name: ..., **options}``,
      :mod:`sae_zoo.reconstruction`; MSE by default) and ``matryoshka_widths`` (every prefix of the latents
      reconstructs on its own: the ``matryoshka`` term);
    * the optimiser: ``lr``, and ``lr_warmup_steps``/``lr_decay_steps`` (steps, or a fraction of the run);
    * the sparsity control: ``target_l0``/``target_l0_rate`` (the coefficient tuned until the L0 averages the
      target) and ``sparsity_warmup_steps``;
    * the start: ``tied_init``, ``decoder_bias_init``, ``bias_init_samples`` (the training rows read for it);
    * dead latents: ``auxk_coeff``/``auxk_k``/``dead_tokens`` (AuxK) and ``resample_every``;
    * ``aids``: further training aids (objects, or ``{"name": ..., **options}`` of registered ones). The field's
      aids may be written there too, and are read into the options above (:data:`FIELD_AIDS`):
      ``aids=[{"name": "auxk", "coeff": 0.03}]`` is ``auxk_coeff=0.03``.

    Every schedule's length (``lr_warmup_steps``, ``lr_decay_steps``, ``sparsity_warmup_steps``, and a top-k head's
    ``k_anneal_steps``) is a number of steps or a fraction of the run (:mod:`sae_zoo.schedules`).
    """

    l1_coeff: float = 0.01
    lr: float = 1e-3
    supervised: bool = False
    sparse_decode: bool = True
    matryoshka_widths: list[int] | None = None
    reconstruction: str | dict[str, Any] | ReconstructionTerm | None = None
    auxk_coeff: float = 0.0
    auxk_k: int | None = None
    dead_tokens: int = 10_000_000
    resample_every: int = 0
    target_l0: float | None = None
    target_l0_rate: float = 0.02
    sparsity_warmup_steps: int | float = 0
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    decoder_bias_init: Literal["mean", "geometric_median"] | None = None
    bias_init_samples: int = 32768
    tied_init: bool = False
    aids: Sequence[TrainingAid | dict[str, Any]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if any(isinstance(aid, dict) and "name" not in aid for aid in self.aids):
            raise ValueError(f"aids: each dict names a registered training aid ({{'name': ..., **options}}), "
                             f"got {list(self.aids)!r}")
        self.aids = self._read_field_aids()
        for name in ("lr", "bias_init_samples", "target_l0", "target_l0_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name in ("l1_coeff", "sparsity_warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)!r}")
        for name in ("lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps"):
            setattr(self, name, steps_or_fraction(getattr(self, name), name))
        if self.reconstruction is not None and self.matryoshka_widths is not None:
            raise ValueError(f"matryoshka_widths sets the matryoshka reconstruction term, and reconstruction="
                             f"{self.reconstruction!r} sets another; give one")
        if self.reconstruction is not None:
            create_reconstruction(self.reconstruction)  # a term that is not registered is named here
        if self.supervised:
            ignored = {"target_l0": self.target_l0, "auxk_coeff": self.auxk_coeff,
                       "matryoshka_widths": self.matryoshka_widths, "reconstruction": self.reconstruction,
                       "resample_every": self.resample_every,
                       "sparsity_warmup_steps": self.sparsity_warmup_steps}
            given = [f"{name}={value!r}" for name, value in ignored.items() if value]
            if given:
                raise ValueError(f"supervised=True trains the encoder on the true codes alone (a per-latent cosine "
                                 f"loss): it has no reconstruction, sparsity penalty or dead-latent term, so "
                                 f"{', '.join(given)} would be ignored; drop " + ("it" if len(given) == 1 else "them")
                                 + ", or train without supervised")

    def _read_field_aids(self) -> tuple[TrainingAid | dict[str, Any], ...]:
        """The aids, less the field's, whose options are read into this config's (an option set both ways, to two
        values, is refused by name)."""
        others = []
        defaults = TrainingConfig.__dataclass_fields__
        for aid in self.aids:
            spec = aid.config() if isinstance(aid, TrainingAid) and aid.name in FIELD_AIDS else aid
            if not (isinstance(spec, dict) and spec.get("name") in FIELD_AIDS):
                others.append(aid)
                continue
            name, fields = spec["name"], FIELD_AIDS[spec["name"]]
            for option, value in spec.items():
                if option == "name":
                    continue
                if option not in fields:
                    raise ValueError(f"aids: the {name!r} aid takes {', '.join(fields)}, got {option!r}")
                field_name = fields[option]
                current = getattr(self, field_name)
                if current != defaults[field_name].default and current != value:
                    raise ValueError(f"aids: the {name!r} aid sets {option}={value!r}, and {field_name}={current!r} "
                                     "is given too; give it once")
                setattr(self, field_name, value)
        return tuple(others)

    @classmethod
    def of(cls, training: "TrainingConfig | dict[str, Any] | None", flat: dict[str, Any]) -> "TrainingConfig":
        """``training`` (an object, a dict of its options, or None: the defaults) with ``flat`` options over it; an
        option given both ways, or that is no option, is refused by name."""
        given = ({f: getattr(training, f) for f in FIELDS} if isinstance(training, TrainingConfig)
                 else dict(training or {}))
        twice = sorted(set(given) & set(flat)) if training is not None else []
        if twice:
            raise TypeError(f"SparseCoder got {', '.join(twice)} both in training and as an argument; give it once")
        unknown = sorted(set({**given, **flat}) - set(FIELDS))
        if unknown:
            raise TypeError(f"SparseCoder got unexpected argument(s) {', '.join(unknown)}; its training options are "
                            f"{', '.join(FIELDS)} (sae_zoo.TrainingConfig)")
        return cls(**{**given, **flat})

    def reconstruction_term(self) -> ReconstructionTerm:
        """The loss's reconstruction term: ``reconstruction``'s, else Matryoshka's with ``matryoshka_widths``, else
        the MSE."""
        if self.reconstruction is not None:
            return create_reconstruction(self.reconstruction)
        return Matryoshka(self.matryoshka_widths) if self.matryoshka_widths is not None else MeanSquaredError()

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values, as saved (aids as their configs; aids and a reconstruction term left out
        when there are none, as a model saved before they were options has them)."""
        options = {f: getattr(self, f) for f in FIELDS if f not in ("aids", "reconstruction")}
        aids = [aid.config() if isinstance(aid, TrainingAid) else dict(aid) for aid in self.aids]
        term = self.reconstruction
        term = term.config() if isinstance(term, ReconstructionTerm) else term
        return {**options, **({"reconstruction": term} if term is not None else {}), **({"aids": aids} if aids else {})}


#: the field's aids, as ``aids`` may name them: aid name -> {its option: the TrainingConfig option it sets}. The
#: dead-latent aid's, the learning-rate schedule's and the decoder-bias start's are registered aids
#: (:mod:`sae_zoo.training`), which the model builds from these options; a target L0 is the sparsity control's
FIELD_AIDS: dict[str, dict[str, str]] = {
    "auxk": {"coeff": "auxk_coeff", "k": "auxk_k", "dead_tokens": "dead_tokens"},
    "resample": {"every": "resample_every", "dead_tokens": "dead_tokens"},
    "dead_latents": {name: name for name in ("auxk_coeff", "auxk_k", "dead_tokens", "resample_every")},
    "lr_schedule": {"warmup_steps": "lr_warmup_steps", "decay_steps": "lr_decay_steps"},
    "decoder_bias_init": {"how": "decoder_bias_init", "samples": "bias_init_samples"},
    "target_l0": {"target": "target_l0", "rate": "target_l0_rate"},
    "sparsity_warmup": {"steps": "sparsity_warmup_steps"},
}

#: every option of a TrainingConfig
FIELDS = tuple(f.name for f in dataclasses.fields(TrainingConfig))


@dataclass
class ModelOptions(TrainingConfig):
    """What a recipe's ``model:`` section takes: the training options, with the model's family (``family``: a
    registered name, :mod:`sae_zoo.families`; ``transcoder``, ``skip_connection`` and ``train_skip``, the keys
    recipes have always written) and ``code_recovery`` (whether evaluation scores codes:
    :class:`~sae_zoo.metrics.Scoring`)."""

    family: str | None = None
    code_recovery: bool = True
    transcoder: bool | None = None
    skip_connection: bool | None = None
    train_skip: bool | None = None
