"""The base class every encoder head derives from."""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._signature import check_types
from .interop import ForeignSAE, UnsupportedConversion


def kept_where_positive(values: Tensor, reference: Tensor, *, in_place: bool = False) -> Tensor:
    """``values`` where ``reference > 0``, else 0: ReLU's backward kernel, which on a CPU is about twice as
    fast as ``torch.where`` on a boolean mask. ``in_place``: written over ``values`` (no fresh tensor)."""
    if in_place:
        return torch.ops.aten.threshold_backward.grad_input(values, reference, 0, grad_input=values)
    return torch.ops.aten.threshold_backward(values, reference, 0)


class SparseCodes(NamedTuple):
    """The non-zero codes of a head with a fixed number of active slots: ``(..., k)`` each."""

    values: Tensor
    indices: Tensor


class TrainingCodes(NamedTuple):
    """A head's codes in training, with what its objective needs beyond them (see ``SparseCoder``).

    ``codes`` are dense ``(..., n_latents)`` or :class:`SparseCodes`. ``sparsity`` is the head's own
    sparsity penalty, a mean over samples and latents (JumpReLU: the L0 through its straight-through
    estimator); None means the L1 of the codes. ``aux_loss`` is a further term the head's objective
    adds (gated: the gate path's reconstruction)."""

    codes: "Tensor | SparseCodes"
    sparsity: Tensor | None = None
    aux_loss: Tensor | None = None


def require_at_least(head: str, minimum: float, **values: float | None) -> None:
    """Raise ``ValueError`` naming the first of ``values`` below ``minimum`` (None is skipped)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{head} needs {name} >= {minimum}, got {name}={value!r}")


class EncoderHead(nn.Module, metaclass=ABCMeta):
    """Maps inputs ``x`` of shape ``(..., d_model)`` to codes ``(..., n_latents)``.

    ``forward(x, dictionary)`` receives the decoder so that iterative heads (which optimise codes
    against the dictionary) and amortised heads (which ignore it) share one interface.

    A subclass implements ``forward`` and ``encode_flops``, declares its hyper-parameters as keyword
    arguments of ``__init__`` after ``d_model`` and ``n_latents`` (their annotated types are checked
    when a head is built), and gives ``example_kwargs``: small hyper-parameters with which the tests
    build, save, reload, count and train every registered head. They are recorded automatically, so
    :meth:`config` rebuilds the head through :func:`~sae_zoo.create_encoder`.

    A head that reproduces other libraries' encoders names their ``architectures`` and implements
    :meth:`from_foreign` (and :meth:`to_foreign` for export).
    """

    #: Registry name, set by :func:`~sae_zoo.encoders.register_encoder`.
    name: ClassVar[str] = ""
    #: Hyper-parameters for a small example (``d_model=6, n_latents=12``), used by the tests of every head.
    example_kwargs: ClassVar[dict[str, Any]] = {}
    #: Other libraries' architectures this head reproduces (see :mod:`sae_zoo.encoders.interop`).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Recipe keys (``{section: {key: value}}``) that a run learning its dictionary with this head gets
    #: unless the recipe sets them: the training that works best for the head (see :mod:`sae_zoo.recipe`).
    learned_dictionary_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Whether the head encodes ``x - dictionary.bias`` (SAELens, sparsify and dictionary_learning
    #: subtract the decoder bias before encoding); such a head needs a dictionary with a bias.
    subtract_decoder_bias: bool = False
    #: Whether every code is >= 0 (a ReLU head): the L1 penalty is then the plain mean of the codes,
    #: which saves an ``abs`` and its backward over the whole (batch x n_latents) tensor.
    nonnegative_codes: ClassVar[bool] = False
    #: Whether the head's codes, or its training terms, come from reconstructing its input through the dictionary
    #: (iterative heads; gated's gate path; LISTA's start): such a head cannot encode for a transcoder, whose
    #: dictionary writes a target that is unknown at inference.
    reads_dictionary: ClassVar[bool] = False
    #: Where a run that targets an L0 starts a head with firing thresholds: at this multiple of the target
    #: (see :mod:`sae_zoo.sparsity`).
    l0_start_factor: ClassVar[float] = 1.0

    def __new__(cls, *args: Any, **kwargs: Any) -> "EncoderHead":
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:
            # copy/unpickle call __new__ without arguments and restore _init_args with the state;
            # a real call with bad arguments fails in __init__ with Python's own message.
            return self
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])
        check_types(cls.__init__, arguments, what=f"encoder {cls.name or cls.__name__!r}")
        object.__setattr__(self, "_init_args", arguments)
        return self

    def __init__(self, d_model: int, n_latents: int) -> None:
        super().__init__()
        require_at_least(type(self).name or type(self).__name__, 1, d_model=d_model, n_latents=n_latents)
        self.d_model = int(d_model)
        self.n_latents = int(n_latents)

    @abstractmethod
    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        """Codes ``(..., n_latents)`` of inputs ``x`` ``(..., d_model)``."""

    @abstractmethod
    def encode_flops(self) -> tuple[float, float]:
        """``(matmul, element-wise)`` FLOPs to encode one sample (see :mod:`sae_zoo.flops`)."""

    def training_encode_flops(self) -> tuple[float, float]:
        """``encode_flops`` of the forward pass in training, where it differs from inference (free codes)."""
        return self.encode_flops()

    def sparse_forward(self, x: Tensor, dictionary: nn.Module | None = None) -> SparseCodes | None:
        """The non-zero codes as :class:`SparseCodes`, for heads whose codes have a fixed number of
        slots (top-k): training then decodes only those atoms. ``None``: no such form."""
        return None

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        """The codes the training loss sees (the sparse form when ``sparse`` and the head has one)."""
        codes = self.sparse_forward(x, dictionary) if sparse else None
        return TrainingCodes(self(x, dictionary) if codes is None else codes)

    def pre_activations(self, x: Tensor, dictionary: nn.Module | None, latents: Tensor) -> Tensor:
        """Differentiable pre-activations ``(..., len(latents))`` of the given latents, for the AuxK loss
        and dead-latent resampling. Heads built on one linear map have them."""
        raise ValueError(self._no_linear_map("AuxK"))

    def reset_latents(self, latents: Tensor, directions: Tensor) -> list[nn.Parameter]:
        """Point the encoder rows of ``latents`` along ``directions`` ``(len(latents), d_model)`` (unit
        rows) and zero their biases: dead-latent resampling. Returns the parameters whose rows ``latents`` it
        reset (their optimizer state is cleared there). Heads built on one linear map implement it."""
        raise ValueError(self._no_linear_map("dead-latent resampling"))

    def _no_linear_map(self, what: str) -> str:
        return (f"the {self.name or type(self).__name__} head has no linear pre-activations, which {what} needs "
                "(heads built on one linear map have them: linear, topk, batchtopk, jumprelu)")

    def on_train_progress(self, progress: float | None, step: int = 0) -> None:
        """Before each training step ``step``: the run's progress in [0, 1] (steps done over all; None where the
        run's length is unknown). A head whose training follows a schedule (top-k's ``k_anneal``, in steps or a
        fraction of the run: :mod:`sae_zoo.schedules`) sets it here."""

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        """``(..., n_latents)``: how far above its firing threshold each latent's pre-activation is (a latent
        fires where its margin is > 0), for heads whose L0 a threshold or penalty sets; None otherwise. With
        :meth:`shift_thresholds`, a run that targets an L0 starts and ends on it (:mod:`sae_zoo.sparsity`)."""
        return None

    def shift_thresholds(self, delta: Tensor) -> None:
        """Raise the firing thresholds by ``delta`` (one value, or one per latent): margins drop by ``delta``."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} head has no firing thresholds to shift")

    @property
    def forced_l0(self) -> int | None:
        """The L0 the head keeps whatever the sparsity penalty (a top-k head's ``k``: per sample, or on
        average over a BatchTopK batch), so that tuning a penalty towards a target L0 is pointless; None
        where a penalty or threshold sets it."""
        return None

    def trained_part(self) -> "EncoderHead | None":
        """The part whose training costs FLOPs (see :mod:`sae_zoo.flops`): the head itself by default."""
        return self

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "d_model": ..., "n_latents": ..., **hyper-parameters}``."""
        return {"name": self.name, **self._init_args}

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "EncoderHead":
        """The head that gives ``sae``'s codes on the dictionary of its unit-normalised decoder rows.
        Raises :class:`~sae_zoo.encoders.interop.UnsupportedConversion` (with the reason) when it cannot."""
        raise UnsupportedConversion(f"the {cls.name or cls.__name__} head converts no other library's SAE")

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        """This head and ``dictionary`` as another library's architecture (for export)."""
        raise UnsupportedConversion(f"no other library has an encoder like sae_zoo's {self.name!r} head")

    def centre(self, x: Tensor, dictionary: nn.Module | None) -> Tensor:
        """``x - dictionary.bias`` when the head subtracts the decoder bias, else ``x``."""
        if not self.subtract_decoder_bias:
            return x
        bias = getattr(dictionary, "bias", None)
        if bias is None:
            raise ValueError(f"{self.name or type(self).__name__} head subtracts the decoder bias "
                             "(subtract_decoder_bias=True), so it needs a dictionary built with bias=True")
        return x - bias

    def centred_linear(self, x: Tensor, dictionary: nn.Module | None, weight: Tensor,
                       bias: Tensor | None = None) -> Tensor:
        """``F.linear(centre(x), weight, bias)``, with the decoder bias's gradient from one vector-matrix
        product: autograd of ``x - b_dec`` would form the input's gradient, a dense ``(batch, d_model)``
        product as costly as the encoder's forward, only to sum it over the batch. Instead the bias gets a
        term that is exactly zero and carries that gradient: ``-weight^T`` times the summed output gradient."""
        b_dec = getattr(dictionary, "bias", None) if self.subtract_decoder_bias else None
        if b_dec is None or not (torch.is_grad_enabled() and b_dec.requires_grad):
            return F.linear(self.centre(x, dictionary), weight, bias)
        carrier = F.linear(b_dec.detach() - b_dec, weight.detach())  # zero, with the gradient wanted
        return F.linear(x - b_dec.detach(), weight, carrier if bias is None else bias + carrier)

    def compute_dtype(self, dictionary: nn.Module | None) -> torch.dtype:
        """The dtype the head computes in: its parameters', else the dictionary's."""
        reference = next(self.parameters(), None)
        if reference is None:
            reference = getattr(dictionary, "weight", None)
        return reference.dtype if reference is not None else torch.get_default_dtype()

    def check_input(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        """``x`` checked and cast to the head's dtype: its width must be ``d_model`` and its dtype a
        floating one; outside training every value must be finite (training leaves that to the loss,
        whose check costs no extra synchronisation)."""
        head = self.name or type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{head} head expects a torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}; "
                            "convert with torch.as_tensor(x, dtype=torch.float32)")
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"{head} head expects inputs of width {self.d_model}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{head} head expects floating-point inputs, got {x.dtype}; convert with x.float()")
        if not self.training and x.numel() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{head} head got {bad} NaN or infinite input value(s) in a batch of shape "
                             f"{tuple(x.shape)}")
        dtype = self.compute_dtype(dictionary)
        return x if x.dtype == dtype else x.to(dtype)
