"""The base class every encoder head derives from."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import Tensor, nn


class EncoderHead(nn.Module):
    """Maps inputs ``x`` of shape ``(..., d_model)`` to non-negative codes ``(..., n_latents)``.

    ``forward(x, dictionary)`` receives the decoder so that iterative heads (which optimise codes
    against the dictionary) and amortised heads (which ignore it) share one interface.

    A subclass declares its hyper-parameters as keyword arguments of ``__init__`` after
    ``d_model`` and ``n_latents``; they are recorded automatically, so :meth:`config` can rebuild
    the head through :func:`~sae_zoo.create_encoder`.
    """

    #: Registry name, set by :func:`~sae_zoo.encoders.register_encoder`.
    name: ClassVar[str] = ""
    #: Whether the head encodes ``x - dictionary.bias`` (SAELens, sparsify and dictionary_learning
    #: subtract the decoder bias before encoding); such a head needs a dictionary with a bias.
    subtract_decoder_bias: bool = False
    #: Whether every code is >= 0 (a ReLU head): the L1 penalty is then the plain mean of the codes,
    #: which saves an ``abs`` and its backward over the whole (batch x n_latents) tensor.
    nonnegative_codes: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> "EncoderHead":
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:
            # copy/unpickle call __new__ without arguments and restore _init_args with the state;
            # a real call with bad arguments fails in __init__ with Python's own message.
            return self
        bound.apply_defaults()
        object.__setattr__(self, "_init_args", dict(list(bound.arguments.items())[1:]))
        return self

    def __init__(self, d_model: int, n_latents: int) -> None:
        super().__init__()
        if d_model < 1 or n_latents < 1:
            raise ValueError(f"{type(self).__name__} needs d_model >= 1 and n_latents >= 1, got ({d_model}, {n_latents})")
        self.d_model = int(d_model)
        self.n_latents = int(n_latents)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        raise NotImplementedError

    def sparse_forward(self, x: Tensor, dictionary: nn.Module | None = None) -> tuple[Tensor, Tensor] | None:
        """``(values, indices)`` of the non-zero codes, ``(..., k)`` each, for heads whose codes have a
        fixed number of slots (top-k): training then decodes only those atoms. ``None``: no such form."""
        return None

    def trained_part(self) -> "EncoderHead | None":
        """The part whose training costs FLOPs (see :mod:`sae_zoo.flops`): the head itself by default."""
        return self

    def encode_flops(self) -> tuple[float, float]:
        """``(matmul, element-wise)`` FLOPs to encode one sample (see :mod:`sae_zoo.flops`)."""
        raise NotImplementedError(f"{self.name or type(self).__name__} does not count its FLOPs (encode_flops)")

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "d_model": ..., "n_latents": ..., **hyper-parameters}``."""
        return {"name": self.name, **self._init_args}

    def centre(self, x: Tensor, dictionary: nn.Module | None) -> Tensor:
        """``x - dictionary.bias`` when the head subtracts the decoder bias, else ``x``."""
        if not self.subtract_decoder_bias:
            return x
        bias = getattr(dictionary, "bias", None)
        if bias is None:
            raise ValueError(f"{self.name or type(self).__name__} head subtracts the decoder bias "
                             "(subtract_decoder_bias=True), so it needs a dictionary built with bias=True")
        return x - bias

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{self.name or type(self).__name__} head expects inputs of width {self.d_model}, "
                             f"got shape {tuple(x.shape)}")
