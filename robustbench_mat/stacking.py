"""K models of one method trained as one: stacked parameters, one vectorised step.

The models' parameters and buffers are stacked along a new first dimension; the method's own
`loss` and `predict` hooks, written for one model, run once under `torch.func.vmap` over the
stack, autograd differentiates the sum of the K losses (each model's gradient, as its parameters
reach no other loss), and one optimiser update with each model's learning rate, weight decay and
momentum moves all of them. Linear layers run as one matrix product for all K models, and the
cross-entropy in a layout that torch computes fast (`stacked_ops`). On the CPU, a step whose
loss depends on nothing but tensors (`replayable`) is recorded once and replayed, without the
Python of `vmap` (`ModelStack.losses_and_gradients`). The shared loop
(`training.train_jobs`) uses it to train models that differ only in numbers: the loop's `lr`,
`weight_decay` and `momentum`, the seed (initial weights and data order), and the method settings
it lists in `Method.stack_varying`, which reach the hooks as 0-d tensors. Every other setting is
shared within a stack (`stack_key`).

A method or network that cannot be stacked (`why_not_stackable`: the method declares
`stackable = False`, brings its own optimiser or per-step hook, holds a layer outside
`STACKABLE_LAYERS`, or reads its data from disk) is trained one model at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from robustbench_mat.method import NO_DECAY, Batch, Method

LOOP_VARYING = ("lr", "weight_decay", "momentum")
STACKABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Sequential,
    nn.ModuleList,
    nn.Identity,
    nn.Flatten,
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
)


def why_not_stackable(method: Method) -> str | None:
    """Why `method` must train alone, or None when it can be stacked."""
    cls = type(method)
    if not cls.stackable:
        return f"method {cls.name!r} declares that its hooks cannot be vectorised"
    for hook in ("configure_optimizer", "after_step"):
        if getattr(cls, hook) is not getattr(Method, hook):
            return f"method {cls.name!r} overrides {hook}"
    if method.hp.get("optimizer", "sgd") not in ("sgd", "adam", "adamw"):
        return f"optimizer {method.hp['optimizer']!r}"
    odd = other_layer(method)
    if odd is not None:
        return f"its network holds a {type(odd).__name__}"
    if _parameter_shared_by_modules(method):
        return "two of its modules share a parameter"
    if not method.train_split().in_memory:
        return f"{method.dataset.name}'s inputs are read from disk"
    return None


def other_layer(method: Method) -> nn.Module | None:
    """The first module of `method`'s networks outside `STACKABLE_LAYERS`, or None when they
    are made of linear layers and activations only."""
    for module in method.modules():
        if module is not method and not isinstance(module, STACKABLE_LAYERS):
            return module
    return None


def varying_settings(method: Method) -> tuple[str, ...]:
    """The settings that may differ between the models of one stack."""
    return (*LOOP_VARYING, *type(method).stack_varying)


def stack_key(method: Method, *shared: Hashable) -> Hashable:
    """Models with equal keys can be trained in one stack: same method, same values of every
    setting outside `varying_settings` (a non-numeric value counts as shared), and equal
    `shared` loop settings."""
    varying = varying_settings(method)
    fixed = tuple(
        sorted(
            (name, repr(value))
            for name, value in method.hp.items()
            if name not in varying or not _is_number(value)
        )
    )
    return (type(method), fixed, *shared)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Batch layouts (shapes) whose step one stack records; beyond them, steps run through vmap.
MAX_RECORDED_STEPS = 4


def replayable(method: Method) -> bool:
    """Whether a stacked step of `method` may be recorded once and replayed: its loss is the
    base one (`Method.loss`: the dataset's cross-entropy of the network's outputs) or declared
    `pure_loss` by the class that defines it, on a dataset that keeps the base loss. Any other
    loss may hold Python state that changes between steps, which a recording would freeze."""
    from robustbench_mat.data import BenchmarkDataset

    owner = next(cls for cls in type(method).__mro__ if "loss" in vars(cls))
    pure = owner is Method or vars(owner).get("pure_loss", False)
    return pure and type(method.dataset).loss is BenchmarkDataset.loss


def _layout(tensor: torch.Tensor | None) -> Hashable:
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)


class MethodHook(nn.Module):
    """Calls a hook of the wrapped method, so that `functional_call` can run it on any state."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, hook: str, *args: Any) -> torch.Tensor:
        return getattr(self.method, hook)(*args)

    def call_with(self, state: dict[str, torch.Tensor], hook: str, *args: Any) -> torch.Tensor:
        """The method's `hook` on `state` (names as in `named_parameters`/`named_buffers`,
        prefixed "method."). A module the method holds under two attributes (CRT's `head` is
        its `model`) is set once, through its first name: torch's weight tying would set it
        twice and, restoring it, leave the stacked tensor in the module."""
        return functional_call(self, state, (hook, *args), strict=False, tie_weights=False)


def _parameter_shared_by_modules(method: Method) -> bool:
    """Whether two different modules of `method` hold one parameter (weight tying), which
    `MethodHook.call_with` would set in the first only."""
    owners: dict[int, int] = {}
    for module in method.modules():
        for _, parameter in module.named_parameters(recurse=False):
            if owners.setdefault(id(parameter), id(module)) != id(module):
                return True
    return False


class ModelStack:
    """The stacked state of K models of one method, with their hooks vectorised over it.

    `members[0]` lends its code; every member keeps its own module, into which `unstack`
    copies its slice of the stack (for `state_dict`, `logged_state`, `finish`)."""

    def __init__(self, members: Sequence[Method]) -> None:
        self.members = list(members)
        base = self.members[0]
        self._hook = MethodHook(base)
        named = [dict(m.named_parameters()) for m in self.members]
        trained = {name for name, p in named[0].items() if p.requires_grad}
        self.params = {name: torch.stack([n[name].detach() for n in named]) for name in named[0]}
        buffers = [dict(m.named_buffers()) for m in self.members]
        self.buffers = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]}
        self.trained = [name for name in self.params if name in trained]
        varying = [name for name in varying_settings(base) if name not in LOOP_VARYING]
        self.shared_hp = {k: v for k, v in base.hp.items() if k not in varying}
        device = next(iter(self.params.values())).device
        self.varying_hp = {
            name: torch.tensor([float(m.hp[name]) for m in self.members], device=device)
            for name in varying
            if name in base.hp and _is_number(base.hp[name])
        }
        for name in varying:
            if name not in self.varying_hp:
                self.shared_hp[name] = base.hp.get(name)
        self.replay = replayable(base) and device.type == "cpu"
        self._recorded: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self.members)

    def _call(self, state: dict[str, torch.Tensor], hp: dict[str, torch.Tensor], hook: str, *args):
        base = self._hook.method
        original = base.hp
        base.hp = {**self.shared_hp, **hp}
        try:
            prefixed = {f"method.{name}": tensor for name, tensor in state.items()}
            return self._hook.call_with(prefixed, hook, *args)
        finally:
            base.hp = original

    def losses_and_gradients(
        self,
        indices: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        a: torch.Tensor | None,
        n_attributes: int,
        per_member: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The K losses of one step and the gradients of each model's trained parameters.
        The batch is the same for all models unless `per_member` (then every tensor has a
        leading dimension K).

        Where the step depends on nothing but the stack's tensors and the batch
        (`replayable`), it is recorded once per batch layout as the graph of the torch
        operations it runs, forward and backward (`make_fx`), and that graph is replayed at
        every later step: the same operations on the same tensors, so the same numbers, without
        the Python of `vmap`, the hooks and autograd (about 35-45 % of a step of 16 linear
        heads). On the CPU only: no recorded step has been checked on a GPU, with its mixed
        precision."""
        state = (self.params, self.buffers, self.varying_hp)
        batch = (indices, x, y, a)
        if not self.replay:
            return self._step(n_attributes, per_member, *state, *batch)
        layout = (n_attributes, per_member, *(_layout(t) for t in batch))
        if layout not in self._recorded and len(self._recorded) < MAX_RECORDED_STEPS:
            self._recorded[layout] = self._record(n_attributes, per_member, state, batch)
        graph = self._recorded.get(layout)
        if graph is None:  # not recordable, or the layouts keep changing
            return self._step(n_attributes, per_member, *state, *batch)
        with torch.no_grad():
            return graph(*state, *batch)

    def _record(
        self, n_attributes: int, per_member: bool, state: tuple, batch: tuple
    ) -> Callable | None:
        """The graph of one step, or None where it cannot be recorded (the step then runs
        as it is, and raises whatever it must itself). Recording runs the step, so it runs on
        copies of the stack's tensors: a loss that updates a buffer (GroupDRO's weights) does
        so once, when the graph is replayed."""
        from torch.fx.experimental.proxy_tensor import make_fx

        copies = tuple({k: t.detach().clone() for k, t in part.items()} for part in state)
        try:
            return make_fx(functools.partial(self._step, n_attributes, per_member))(*copies, *batch)
        except Exception:
            return None

    def _step(
        self,
        n_attributes: int,
        per_member: bool,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        varying_hp: dict[str, torch.Tensor],
        indices: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        a: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trained = {name: params[name].requires_grad_() for name in self.trained}
        frozen = {name: t for name, t in params.items() if name not in trained}

        def one(state, hp, indices, x, y, a):
            return self._call(state, hp, "loss", Batch(indices, x, y, a, n_attributes))

        data_dim = 0 if per_member else None
        in_dims = (0, 0, data_dim, data_dim, data_dim, None if a is None else data_dim)
        with stacked_ops():
            losses = vmap(one, in_dims=in_dims)(
                {**trained, **frozen, **buffers}, varying_hp, indices, x, y, a
            )
        gradients = torch.autograd.grad(
            losses.sum(), list(trained.values()), allow_unused=True, materialize_grads=True
        )
        return losses.detach(), dict(zip(trained, gradients, strict=True))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every model on the same inputs: shape (K, len(x), ...)."""

        def one(params, buffers, hp, x):
            return self._call({**params, **buffers}, hp, "predict", x)

        with stacked_ops():
            return vmap(one, in_dims=(0, 0, 0, None))(self.params, self.buffers, self.varying_hp, x)

    @torch.no_grad()
    def unstack(self, k: int) -> Method:
        """Member k, its parameters and buffers set to its slice of the stack."""
        member = self.members[k]
        for name, tensor in member.named_parameters():
            tensor.copy_(self.params[name][k])
        for name, tensor in member.named_buffers():
            tensor.copy_(self.buffers[name][k])
        return member


@torch.no_grad()
def predict_states(
    method: Method, states: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor
) -> torch.Tensor:
    """Logits of `method` under each of `states` (its own state dicts, e.g. kept at several
    steps) on the same inputs, in one vectorised pass: shape (len(states), len(x), ...). As in
    `ModelStack`, a tensor held under several names is set under its first."""
    hook = MethodHook(method)
    names = [name for name, _ in (*method.named_parameters(), *method.named_buffers())]
    stacked = {
        f"method.{name}": torch.stack([s[name] for s in states])
        for name in names
        if name in states[0]
    }

    def one(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return hook.call_with(state, "predict", x)

    with stacked_ops():
        return vmap(one, in_dims=(0, None))(stacked, x)


class _Linear(torch.autograd.Function):
    """`F.linear` with a vmap rule for stacked weights: inputs shared by the K models meet all K
    weight matrices in one matrix product, and per-model inputs in one batched product. torch's
    generic rule copies shared inputs once per model, and under autograd ran a 16-model linear
    head's step about 6 times slower than this."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad
        return (
            grad @ weight if wants_x else None,
            flat_grad.T @ x.reshape(-1, x.shape[-1]) if wants_weight else None,
            flat_grad.sum(0) if ctx.has_bias and wants_bias else None,
        )

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x, weight, bias) -> tuple[torch.Tensor, int | None]:
        x_dim, weight_dim, bias_dim = in_dims
        if weight_dim is None:  # a weight that is not stacked: torch's own rule
            return vmap(F.linear, in_dims=in_dims)(x, weight, bias), 0
        weight = weight.movedim(weight_dim, 0)
        k, out = weight.shape[:2]
        if bias is not None:
            bias = bias.movedim(bias_dim, 0) if bias_dim is not None else bias.expand(k, out)
        if x_dim is None:
            flat_bias = None if bias is None else bias.reshape(-1)
            flat = F.linear(x, weight.reshape(k * out, -1), flat_bias)
            return flat.unflatten(-1, (k, out)).movedim(-2, 0), 0
        x = x.movedim(x_dim, 0)
        rows = x.reshape(k, -1, x.shape[-1])
        product = (
            torch.bmm(rows, weight.transpose(1, 2))
            if bias is None
            else torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
        )
        return product.reshape(*x.shape[:-1], out), 0


IGNORED_CLASS = -100  # F.cross_entropy's default ignore_index
_CROSS_ENTROPY_ARGS = (
    "input",
    "target",
    "weight",
    "size_average",
    "ignore_index",
    "reduce",
    "reduction",
    "label_smoothing",
)


class _CrossEntropy(torch.autograd.Function):
    """`F.cross_entropy` of (N, C) logits and class indices, with a vmap rule that lays the
    stacked logits out as (K, C, N): torch's softmax over a last dimension as short as two
    classes runs element by element, and took about 0.8 ms for 32 models' 1000 × 2 logits,
    against about 0.2 ms over the middle dimension. Same reductions and ignored index."""

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction=reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        logits, target, ctx.reduction = inputs
        ctx.save_for_backward(logits, target)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, target = ctx.saved_tensors
        kept = target != IGNORED_CLASS
        hot = F.one_hot(target.clamp(min=0), logits.shape[-1]).to(logits.dtype)
        per_example = (logits.softmax(-1) - hot) * kept.unsqueeze(-1)
        if ctx.reduction == "none":
            scale = grad.unsqueeze(-1)
        elif ctx.reduction == "sum":
            scale = grad
        else:
            scale = grad / kept.sum()
        return per_example * scale, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, logits, target, reduction) -> tuple[torch.Tensor, int]:
        logits_dim, target_dim, _ = in_dims
        if logits_dim is None:  # one model's logits, stacked targets: torch's own rule
            rule = vmap(lambda t: F.cross_entropy(logits, t, reduction=reduction))
            return rule(target.movedim(target_dim, 0)), 0
        logits = logits.movedim(logits_dim, 0)
        k = logits.shape[0]
        if target_dim is None:
            target = target.expand(k, *target.shape)
        else:
            target = target.movedim(target_dim, 0)
        losses = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        if reduction == "none":
            return losses, 0
        if reduction == "sum":
            return losses.sum(1), 0
        return losses.sum(1) / (target != IGNORED_CLASS).sum(1), 0


def _plain_cross_entropy(named: dict[str, Any]) -> bool:
    """Class-index targets for (N, C) logits with torch's defaults but for `reduction`: the
    calls `_CrossEntropy` takes."""
    return (
        named["input"].dim() == 2
        and not named["target"].is_floating_point()
        and named.get("weight") is None
        and named.get("size_average") is None
        and named.get("reduce") is None
        and named.get("ignore_index", IGNORED_CLASS) == IGNORED_CLASS
        and named.get("label_smoothing", 0.0) == 0.0
        and named.get("reduction", "mean") in ("mean", "sum", "none")
    )


class stacked_ops(TorchFunctionMode):  # noqa: N801 (used as a context manager)
    """Within it, `F.linear` (every `nn.Linear`) runs through `_Linear`'s stacked rule, and a
    plain `F.cross_entropy` through `_CrossEntropy`'s."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = {**dict(zip(("input", "weight", "bias"), args, strict=False)), **kwargs}
            return _Linear.apply(named["input"], named["weight"], named.get("bias"))
        if func is F.cross_entropy:
            named = {**dict(zip(_CROSS_ENTROPY_ARGS, args, strict=False)), **kwargs}
            if _plain_cross_entropy(named):
                reduction = named.get("reduction", "mean")
                return _CrossEntropy.apply(named["input"], named["target"], reduction)
        return func(*args, **kwargs)


class StackedOptimizer:
    """SGD, Adam or AdamW (torch's update rules, op for op) over stacked parameters, with one
    learning rate, weight decay and momentum per model. A model whose `active` flag is off is
    left where it is. Its state converts to and from each member's own torch optimiser state, so
    that a model's checkpoint is the same whether it was trained alone or in a stack."""

    def __init__(self, stack: ModelStack) -> None:
        self.stack = stack
        hps = [m.hp for m in stack.members]
        self.kind = hps[0]["optimizer"]
        self.lr = torch.tensor([float(hp["lr"]) for hp in hps], dtype=torch.float64)
        self.weight_decay = torch.tensor(
            [float(hp["weight_decay"]) for hp in hps], dtype=torch.float64
        )
        self.momentum = torch.tensor(
            [float(hp.get("momentum", 0)) for hp in hps], dtype=torch.float64
        )
        self.active = torch.ones(len(hps), dtype=torch.float64)
        self.exempt = {
            name
            for name in stack.params
            if hps[0].get("no_decay_groups") and any(part in name for part in NO_DECAY)
        }
        self._zero = torch.zeros_like(self.weight_decay)
        self._converted: dict[tuple[Any, ...], torch.Tensor] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.betas, self.eps = (0.9, 0.999), 1e-8

    def _per_model(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`values` (one per model) shaped to broadcast over `like`, in its dtype; the fixed
        settings are converted once."""
        fixed = values is self.momentum or values is self.weight_decay or values is self._zero
        key = (id(values), like.dim(), like.dtype, like.device)
        if fixed and key in self._converted:
            return self._converted[key]
        shape = (-1, *([1] * (like.dim() - 1)))
        converted = values.reshape(shape).to(device=like.device, dtype=like.dtype)
        if fixed:
            self._converted[key] = converted
        return converted

    @torch.no_grad()
    def step(
        self, gradients: dict[str, torch.Tensor], lr_scale: torch.Tensor | None = None
    ) -> None:
        """One update of every trained parameter from its stacked gradient."""
        lr = self.lr * self.active
        if lr_scale is not None:
            lr = lr * lr_scale
        for name, grad in gradients.items():
            param = self.stack.params[name]
            exempt = name in self.exempt
            decay = self._zero if exempt else self.weight_decay
            if self.kind == "sgd":
                self._sgd(name, param, grad, lr, decay)
            else:
                self._adam(name, param, grad, lr, decay)

    def _sgd(
        self,
        name: str,
        param: torch.Tensor,
        grad: torch.Tensor,
        lr: torch.Tensor,
        decay: torch.Tensor,
    ) -> None:
        grad = grad + self._per_model(decay, param) * param
        if name not in self.state:
            self.state[name] = {"momentum_buffer": torch.zeros_like(param)}
        buffer = self.state[name]["momentum_buffer"]
        buffer.mul_(self._per_model(self.momentum, param)).add_(grad)
        param.sub_(self._per_model(lr, param) * buffer)

    def _adam(
        self,
        name: str,
        param: torch.Tensor,
        grad: torch.Tensor,
        lr: torch.Tensor,
        decay: torch.Tensor,
    ) -> None:
        beta1, beta2 = self.betas
        if self.kind == "adamw":
            param.mul_(self._per_model(1 - lr * decay, param))
        else:
            grad = grad + self._per_model(decay, param) * param
        state = self.state.setdefault(
            name,
            {
                "exp_avg": torch.zeros_like(param),
                "exp_avg_sq": torch.zeros_like(param),
                "step": torch.zeros(len(self.lr), dtype=torch.float64),
            },
        )
        state["step"] += self.active
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = state["step"].clamp(min=1)
        correction1 = 1 - beta1**steps
        correction2_sqrt = (1 - beta2**steps).sqrt()
        step_size = lr / correction1
        denom = (state["exp_avg_sq"].sqrt() / self._per_model(correction2_sqrt, param)).add_(
            self.eps
        )
        param.sub_(self._per_model(step_size, param) * (state["exp_avg"] / denom))

    # --- conversion to and from each member's torch optimiser --------------------------------
    def load_member(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Take member k's state from its own (loaded) torch optimiser."""
        member = self.stack.members[k]
        names = {id(p): name for name, p in member.named_parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                saved = optimizer.state.get(param, {})
                name = names[id(param)]
                stacked = self.stack.params[name]
                if self.kind == "sgd":
                    buffer = saved.get("momentum_buffer")
                    state = self.state.setdefault(
                        name, {"momentum_buffer": torch.zeros_like(stacked)}
                    )
                    if buffer is not None:
                        state["momentum_buffer"][k].copy_(buffer)
                elif saved:
                    state = self.state.setdefault(
                        name,
                        {
                            "exp_avg": torch.zeros_like(stacked),
                            "exp_avg_sq": torch.zeros_like(stacked),
                            "step": torch.zeros(len(self.lr), dtype=torch.float64),
                        },
                    )
                    state["exp_avg"][k].copy_(saved["exp_avg"])
                    state["exp_avg_sq"][k].copy_(saved["exp_avg_sq"])
                    state["step"][k] = float(saved["step"])

    def export_member(self, k: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Member k's state as its own torch optimiser's `state_dict`."""
        member = self.stack.members[k]
        names = {id(p): name for name, p in member.named_parameters()}
        optimizer.state.clear()
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = self.state.get(names[id(param)])
                if state is None:
                    continue
                if self.kind == "sgd":
                    momentum = float(self.momentum[k])
                    buffer = state["momentum_buffer"][k].clone() if momentum != 0 else None
                    optimizer.state[param] = {"momentum_buffer": buffer}
                elif float(state["step"][k]) > 0:
                    optimizer.state[param] = {
                        "step": torch.tensor(float(state["step"][k])),
                        "exp_avg": state["exp_avg"][k].clone(),
                        "exp_avg_sq": state["exp_avg_sq"][k].clone(),
                    }
        return optimizer.state_dict()
