"""Weight clusters of a model: the matrices (or gate row slices of fused RNN weights) that get one
bit width each, and the leftovers (biases, norms)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces.gates import GRU_GATES, LSTM_GATES

# Row blocks of torch's fused recurrent weights, in torch's row order. Plain RNNs have one block.
_RNN_GATES = {"LSTM": LSTM_GATES, "GRU": GRU_GATES}


@dataclass(frozen=True)
class Cluster:
    """One quantization cluster: rows ``rows`` (None = all) of parameter ``param`` of ``module``."""

    name: str  # the key in a PrecisionMap
    module: str  # fully qualified name of the module that owns the parameter
    param: str  # attribute name on that module: "weight", "weight_ih_l0", "in_proj_weight"
    rows: tuple[int, int] | None  # [start, stop) row slice of the parameter, None = whole tensor
    shape: tuple[int, ...]  # shape of the cluster itself (the slice, not the whole parameter)

    @property
    def numel(self) -> int:
        """Number of weights in the cluster."""
        return math.prod(self.shape)


def _module_clusters(module: nn.Module) -> Iterator[tuple[str, str, tuple[int, int] | None]]:
    """``(name suffix, parameter name, rows)`` of every cluster owned by ``module`` itself."""
    if isinstance(module, nn.Linear | nn.Embedding):
        yield "", "weight", None
    elif isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:  # one packed [3E, E] matrix: q, k, v are row blocks
            e = module.embed_dim
            for i, part in enumerate("qkv"):
                yield f"in_proj.{part}", "in_proj_weight", (i * e, (i + 1) * e)
        else:
            for part in "qkv":
                yield f"{part}_proj_weight", f"{part}_proj_weight", None
    elif isinstance(module, nn.RNNBase):
        gates = _RNN_GATES.get(module.mode, ())
        h = module.hidden_size
        for pname in module._flat_weights_names:
            if not pname.startswith("weight_"):
                continue  # biases stay FP
            if gates and pname.startswith(("weight_ih", "weight_hh")):
                for i, gate in enumerate(gates):
                    yield f"{pname}.{gate}", pname, (i * h, (i + 1) * h)
            else:  # plain RNN matrices and the LSTM projection weight_hr_l{k}
                yield pname, pname, None


def _latent_parameter(module: nn.Module, param: str) -> torch.Tensor:
    """The stored tensor behind ``module.<param>``: the latent weight when fake-quantized."""
    if parametrize.is_parametrized(module, param):
        plist = module.parametrizations[param]
        # Only our own fake quantization keeps ``original`` equal to the weight's meaning;
        # quantizing the latent of e.g. an orthogonal or weight-norm parametrization is wrong.
        if not all(getattr(p, "is_mpnas_fake_quantize", False) for p in plist):
            raise ValueError(f"{type(module).__name__}.{param} carries a parametrization that is not mpnas fake "
                             "quantization; remove it before quantizing")
        return plist.original
    return getattr(module, param)


def find_clusters(model: nn.Module) -> dict[str, Cluster]:
    """Every quantization cluster of ``model``, in ``named_modules`` order.

    Names: the module's FQN for ``nn.Linear`` / ``nn.Embedding`` (``"weight"`` for a bare root
    module); ``{M}.weight_ih_l{k}.{gate}`` / ``{M}.weight_hh_l{k}.{gate}`` for torch's ``nn.LSTM``
    (gates input_gate, forget_gate, cell_gate, output_gate) and ``nn.GRU`` (reset_gate,
    update_gate, new_gate), ``{M}.weight_hh_l{k}`` for a plain ``nn.RNN``; ``{M}.in_proj.{q,k,v}``
    for a packed ``nn.MultiheadAttention`` (``{M}.q_proj_weight`` etc. when unpacked). A parameter
    shared by several modules (tied embedding and softmax) is one cluster, under its first owner.
    Fake-quantized models give the same clusters as before (see ``search_spaces.apply``).
    """
    clusters: dict[str, Cluster] = {}
    owner: dict[int, str] = {}  # id(parameter) -> FQN of the module that claimed it first
    for fqn, module in model.named_modules():
        for suffix, pname, rows in _module_clusters(module):
            tensor = _latent_parameter(module, pname)
            if isinstance(tensor, nn.parameter.UninitializedParameter):
                raise ValueError(f"{fqn or type(module).__name__}.{pname} is not initialized yet (a lazy "
                                 "module); run one forward pass before looking for clusters")
            if owner.setdefault(id(tensor), fqn) != fqn:
                continue  # tied: already a cluster of an earlier module
            name = ".".join(part for part in (fqn, suffix) if part) or pname
            if name in clusters:
                raise ValueError(f"two clusters are both named {name!r}; rename one of the modules")
            shape = tuple(tensor.shape) if rows is None else (rows[1] - rows[0], *tensor.shape[1:])
            clusters[name] = Cluster(name, fqn, pname, rows, shape)
    return clusters


def cluster_parameter(model: nn.Module, cluster: Cluster) -> torch.Tensor:
    """The whole live parameter holding ``cluster`` (the latent weight if fake-quantized)."""
    try:
        module = model.get_submodule(cluster.module)
    except AttributeError as exc:
        raise ValueError(f"cluster {cluster.name!r}: model has no module {cluster.module!r}") from exc
    try:
        return _latent_parameter(module, cluster.param)
    except AttributeError as exc:
        raise ValueError(f"cluster {cluster.name!r}: module {cluster.module!r} has no {cluster.param!r}") from exc


def cluster_weight(model: nn.Module, cluster: Cluster) -> torch.Tensor:
    """A view of the live weights of ``cluster``: autograd and in-place writes reach the model.

    For a whole-tensor cluster this is the parameter itself; for a row slice, ``param[a:b]``.
    On a fake-quantized model it is (a view of) the trainable latent FP weight.
    """
    tensor = cluster_parameter(model, cluster)
    view = tensor if cluster.rows is None else tensor[cluster.rows[0]:cluster.rows[1]]
    if tuple(view.shape) != cluster.shape:
        raise ValueError(f"cluster {cluster.name!r} has shape {cluster.shape}, but the model's weight has "
                         f"{tuple(view.shape)}; was the model changed after find_clusters?")
    return view


def find_leftovers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point parameter outside every cluster: what ``leftover_bits`` quantizes.

    Keys are ``{module FQN}.{parameter}`` in ``named_modules`` order; a tensor shared by several
    modules is listed once, under its first owner. Values are the live tensors (the latent one
    when fake-quantized), so in-place writes reach the model. Buffers are not included.
    """
    clustered = {id(cluster_parameter(model, c)) for c in find_clusters(model).values()}
    leftovers: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for fqn, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # their ``original`` is reached through the owner module below
        names = [*(n for n, p in module._parameters.items() if p is not None),
                 *(module.parametrizations if parametrize.is_parametrized(module) else ())]
        for pname in names:
            tensor = _latent_parameter(module, pname)
            if id(tensor) in clustered or id(tensor) in seen or not torch.is_floating_point(tensor):
                continue
            seen.add(id(tensor))
            leftovers[f"{fqn}.{pname}" if fqn else pname] = tensor
    return leftovers
