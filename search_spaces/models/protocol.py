"""What a language model must provide to mpnas, and the adapter that gives a plain torch module that interface.

The protocol (:class:`LanguageModel`), written down once; every evaluator, search strategy,
retraining loop and exporter of mpnas relies on nothing else:

- ``forward(tokens, state=None, targets=None) -> LMOutput``: ``tokens`` ``[batch, time]`` ids give
  ``logits`` ``[batch, time, vocab]``, ``loss`` (mean token cross-entropy when ``targets`` are given,
  else None) and ``state`` (what a recurrent model carries into the next chunk; None otherwise).
- Recurrent models (:class:`RecurrentLanguageModel`) also have ``init_state(batch_size, device)``,
  ``detach_state(state)`` (cut the graph between chunks) and ``select_state(state, rows)`` (the
  state of some batch rows). A model is recurrent exactly when it has ``init_state``.
- Window models (Transformers) have ``config.context``: the window length perplexity and the kl
  strategy run them on (None: the caller must give one).
- Quantization clusters are the model's own modules (``find_clusters``), so precision maps,
  packed files and ``state_dict`` keys use the module names of the model.

:func:`as_lm` wraps a plain module, e.g. ``nn.Embedding + nn.LSTM + nn.Linear`` whose
``forward(tokens, state)`` returns ``logits`` or ``(logits, state)``, or a Transformer whose
``forward(tokens)`` returns ``logits``, into a :class:`ModuleLM`. The adapter shares the module's
own tables of parameters, buffers and submodules (no copies, no ``module.`` prefix in names), so
quantizing or retraining the adapter changes the user's module and every cluster keeps the name it
has in the user's module. Models that already follow the protocol pass unchanged: mpnas's own, any
class with ``is_mpnas_lm = True``, and (as mpnas always accepted) modules with ``init_state`` or a
``config.context``.

Limitation: ``fake_quantize_`` with ``leftover_bits`` < 32 on an adapter whose wrapped module has
parameters of its own (not in a submodule) would parametrize the adapter, not the user's module;
call it on the user's module instead (the retraining of :mod:`nas.api` does not use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.models.lstm_lm import LMOutput


@runtime_checkable
class LanguageModel(Protocol):
    """Any LM mpnas can search, retrain, export and evaluate (module docstring)."""

    def forward(self, tokens: torch.Tensor, state: Any = None, targets: torch.Tensor | None = None) -> LMOutput:
        """``tokens`` [batch, time] -> logits [batch, time, vocab], mean loss (with targets), new state."""
        ...


@runtime_checkable
class RecurrentLanguageModel(LanguageModel, Protocol):
    """A language model that carries a state across chunks of a token stream."""

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        """The state before the first token (None lets ``forward`` choose its own zero state)."""
        ...

    def detach_state(self, state: Any) -> Any:
        """``state`` cut from the autograd graph (truncated BPTT)."""
        ...

    def select_state(self, state: Any, rows: slice) -> Any:
        """The state of batch rows ``rows`` only."""
        ...


@dataclass(frozen=True)
class ModuleLMConfig:
    """How :class:`ModuleLM` runs the wrapped module."""

    recurrent: bool
    context: int | None = None  # window models: the window length (None: callers must give one)
    state_batch_dim: int = 1  # the batch dimension of every state tensor (1 for torch's nn.LSTM / nn.GRU)


def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a state made of tensors, tuples, lists and dicts (None stays None)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple keeps its type
        return type(state)(*(map_state(s, fn) for s in state))
    if isinstance(state, list | tuple):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    return state


def _split_output(out: Any) -> tuple[torch.Tensor, Any]:
    """``(logits, state)`` from what a plain module returned: logits, ``(logits, state)`` or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out, None
    if hasattr(out, "logits"):
        return out.logits, getattr(out, "state", None)
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0], out[1] if len(out) > 1 else None
    raise TypeError(f"a language model's forward must return logits, (logits, state) or an object with .logits; "
                    f"got {type(out).__name__}")


class ModuleLM(nn.Module):
    """A plain torch LM behind the mpnas protocol; build it with :func:`as_lm`.

    The wrapped module's parameter, buffer and submodule tables are this module's own (shared,
    not copied): names, ``state_dict`` keys and clusters are the wrapped module's, and every
    in-place change (quantization, retraining, ``load_state_dict``, ``.to``) reaches it.
    """

    is_mpnas_lm = True

    def __init__(self, module: nn.Module, config: ModuleLMConfig) -> None:
        super().__init__()
        if isinstance(module, ModuleLM):
            raise TypeError("module is already a ModuleLM")
        object.__setattr__(self, "_wrapped", module)  # not a registered child: its children are ours
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._modules = module._modules
        self.config = config
        self.training = module.training

    @property
    def wrapped(self) -> nn.Module:
        """The user's module."""
        return self._wrapped

    def train(self, mode: bool = True) -> ModuleLM:
        """Set train/eval mode here, on the shared children and on the wrapped module itself."""
        super().train(mode)
        self._wrapped.training = mode
        return self

    def forward(self, tokens: torch.Tensor, state: Any = None, targets: torch.Tensor | None = None) -> LMOutput:
        """Run the wrapped module (``module(tokens, state)`` if recurrent, else ``module(tokens)``)."""
        context = self.config.context
        if not self.config.recurrent and context is not None and tokens.size(1) > context:
            raise ValueError(f"sequence of {tokens.size(1)} tokens exceeds the model's context of {context}")
        out = self._wrapped(tokens, state) if self.config.recurrent else self._wrapped(tokens)
        logits, new_state = _split_output(out)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"{type(self._wrapped).__name__} returned logits of shape {tuple(logits.shape)} for "
                             f"tokens of shape {tuple(tokens.shape)}; expected [batch, time, vocab]")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return LMOutput(logits, loss, new_state if self.config.recurrent else None)

    def extra_repr(self) -> str:
        return f"wraps={type(self._wrapped).__name__}, {self.config}"


class RecurrentModuleLM(ModuleLM):
    """:class:`ModuleLM` of a recurrent module: the state is whatever the module returns."""

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        """None: the wrapped module starts from its own zero state (as torch's RNNs do with ``hx=None``)."""
        return None

    @staticmethod
    def detach_state(state: Any) -> Any:
        """Every tensor of ``state`` detached."""
        return map_state(state, torch.Tensor.detach)

    def select_state(self, state: Any, rows: slice) -> Any:
        """Every tensor of ``state`` sliced at ``rows`` along ``config.state_batch_dim``."""
        index = (slice(None),) * self.config.state_batch_dim + (rows,)
        return map_state(state, lambda t: t[index])


def is_recurrent_module(module: nn.Module) -> bool:
    """Whether a plain module holds a torch RNN (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``)."""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def follows_protocol(module: nn.Module) -> bool:
    """Whether ``module`` already is an mpnas LM: ``is_mpnas_lm``, or the duck-typed marks of the
    protocol that mpnas has always accepted (``init_state``, or a ``config.context``)."""
    return bool(getattr(module, "is_mpnas_lm", False) or hasattr(module, "init_state")
                or getattr(getattr(module, "config", None), "context", None) is not None)


def as_lm(module: nn.Module, *, context: int | None = None, recurrent: bool | None = None,
          state_batch_dim: int = 1) -> nn.Module:
    """``module`` behind the mpnas LM protocol (module docstring); mpnas models come back unchanged.

    ``recurrent`` defaults to whether ``module`` holds a torch RNN. A recurrent module is called as
    ``module(tokens, state)`` (``state`` None at the start of a stream) and must return ``(logits,
    state)``; ``state_batch_dim`` is the batch dimension of its state tensors (torch's RNNs: 1). A
    window module is called as ``module(tokens)``; ``context`` is the longest window it takes. An
    adapter without a context gets ``context`` filled in; one with a context keeps it.
    """
    if isinstance(module, ModuleLM):
        if context is None or module.config.context is not None or module.config.recurrent:
            return module
        return type(module)(module.wrapped, ModuleLMConfig(False, context, module.config.state_batch_dim))
    if follows_protocol(module):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch nn.Module language model, got {type(module).__name__}")
    if context is not None and context < 1:
        raise ValueError(f"context={context} must be >= 1")
    recurrent = is_recurrent_module(module) if recurrent is None else recurrent
    cls = RecurrentModuleLM if recurrent else ModuleLM
    return cls(module, ModuleLMConfig(recurrent, None if recurrent else context, state_batch_dim))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind an adapter; any other model as it is."""
    return model.wrapped if isinstance(model, ModuleLM) else model


def select_state(model: nn.Module, state: Any, rows: slice) -> Any:
    """``model.select_state(state, rows)``, or the rows of an LSTMLM-style ``[(h, c), ...]`` state."""
    if hasattr(model, "select_state"):
        return model.select_state(state, rows)
    return [(h[rows], c[rows]) for h, c in state]
