"""ferry's CPU optimizers as ``torch.optim.Optimizer`` subclasses (docs/optim.md).

Drop-in replacements for ``torch.optim.AdamW``, ``Adam``, ``SGD`` and ``Adagrad`` in any
PyTorch loop whose parameters live on the CPU. Each update is one vectorized (AVX-512, AVX2 or
scalar), multi-threaded pass of ferry's C++ kernel over a parameter, computing torch's update
rule in fp32.

- Parameters: contiguous CPU tensors, float32, or bfloat16/float16 with an fp32 master copy
  kept in the state under ``"master"``; the kernel writes the rounded low-precision weights
  back into the parameter in the same pass. Gradients: float32, bfloat16 or float16.
- State: the keys and layout of torch's optimizers (AdamW/Adam: ``step``, ``exp_avg``,
  ``exp_avg_sq``; SGD: ``momentum_buffer``; Adagrad: ``step``, ``sum``), always fp32, so a
  ``state_dict()`` loads into torch's optimizer and the other way round.
- A parameter whose gradient holds an Inf or NaN is left unchanged, its state too, and its
  step count does not advance (torch would write NaNs); ``skipped_in_last_step`` counts them.
- Not supported: ``amsgrad``, ``maximize``, sparse gradients, complex parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch

from ._C import optim as _kernels

Params = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]]
State = Dict[str, Any]


def _fp32_state(state: State, key: str, like: torch.Tensor) -> torch.Tensor:
    """The state tensor under ``key``, created as zeros, and kept fp32 and contiguous (torch's
    load_state_dict casts state to the parameter's dtype)."""
    value = state.get(key)
    if value is None:
        value = torch.zeros(like.shape, dtype=torch.float32)
    elif value.dtype != torch.float32 or not value.is_contiguous():
        value = value.to(torch.float32).contiguous()
    state[key] = value
    return value


def _step_count(state: State) -> int:
    step = state.get("step", 0)
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def _advance_step(state: State) -> None:
    step = state.get("step")
    if isinstance(step, torch.Tensor):
        step += 1
    else:
        state["step"] = torch.tensor(float(_step_count(state) + 1))


class _CPUOptimizer(torch.optim.Optimizer):
    """What the four optimizers share: ``step()`` visits every parameter with a gradient."""

    def __init__(self, params: Params, defaults: Dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.skipped_in_last_step: int = 0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One update of every parameter that has a gradient. ``closure`` re-evaluates the
        model and returns the loss, as for torch's optimizers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.skipped_in_last_step = 0
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError(f"{type(self).__name__}: amsgrad and maximize are not "
                                 "supported; set them to False")
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients")
                master, out = self._master(param)
                if self._update(group, self.state[param], master, param.grad, out):
                    self.skipped_in_last_step += 1
        return loss

    def _master(self, param: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fp32 weights the kernel updates, and the low-precision parameter it then writes
        (None for an fp32 parameter, which is its own master)."""
        if param.dtype == torch.float32:
            return param, None
        state = self.state[param]
        if "master" not in state:
            state["master"] = param.detach().to(torch.float32)
        return _fp32_state(state, "master", param), param

    def _update(self, group: Dict[str, Any], state: State, master: torch.Tensor,
                grad: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
        """Updates one parameter; returns True when it was skipped (non-finite gradient)."""
        raise NotImplementedError


class _AdamFamily(_CPUOptimizer):
    _check: Callable[..., None]
    _kernel: Callable[..., bool]

    def __init__(self, params: Params, lr: float, betas: Tuple[float, float], eps: float,
                 weight_decay: float, amsgrad: bool, maximize: bool) -> None:
        type(self)._check(lr, betas[0], betas[1], eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, foreach=None,
                                      capturable=False))
        if amsgrad or maximize:
            raise ValueError(f"{type(self).__name__}: amsgrad and maximize are not supported")

    def _update(self, group: Dict[str, Any], state: State, master: torch.Tensor,
                grad: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        exp_avg = _fp32_state(state, "exp_avg", master)
        exp_avg_sq = _fp32_state(state, "exp_avg_sq", master)
        beta1, beta2 = group["betas"]
        skipped = type(self)._kernel(master, exp_avg, exp_avg_sq, grad.contiguous(),
                                     _step_count(state) + 1, group["lr"], beta1, beta2,
                                     group["eps"], group["weight_decay"], out)
        if not skipped:
            _advance_step(state)
        return skipped


class CPUAdamW(_AdamFamily):
    """``torch.optim.AdamW`` (decoupled weight decay) on ferry's CPU kernel."""

    _check = staticmethod(_kernels.check_adamw)
    _kernel = staticmethod(_kernels.adamw_step)

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


class CPUAdam(_AdamFamily):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) on ferry's CPU kernel."""

    _check = staticmethod(_kernels.check_adam)
    _kernel = staticmethod(_kernels.adam_step)

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


class CPUSGD(_CPUOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) on ferry's CPU
    kernel."""

    def __init__(self, params: Params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        _kernels.check_sgd(lr, momentum, dampening, weight_decay, nesterov)
        if maximize:
            raise ValueError("CPUSGD: maximize is not supported")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, foreach=None))

    def _update(self, group: Dict[str, Any], state: State, master: torch.Tensor,
                grad: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
        buffer = None
        first_step = state.get("momentum_buffer") is None
        if group["momentum"] != 0:
            buffer = _fp32_state(state, "momentum_buffer", master)
        skipped = _kernels.sgd_step(master, buffer, grad.contiguous(), 1 if first_step else 2,
                                    group["lr"], group["momentum"], group["dampening"],
                                    group["weight_decay"], group["nesterov"], out)
        if skipped and first_step and buffer is not None:
            del state["momentum_buffer"]  # as torch: the first real step sets it to the gradient
        return skipped


class CPUAdagrad(_CPUOptimizer):
    """``torch.optim.Adagrad`` on ferry's CPU kernel."""

    def __init__(self, params: Params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False) -> None:
        _kernels.check_adagrad(lr, lr_decay, weight_decay, eps)
        if initial_accumulator_value < 0:
            raise ValueError(f"CPUAdagrad: initial_accumulator_value = "
                             f"{initial_accumulator_value} is invalid; it must be >= 0")
        if maximize:
            raise ValueError("CPUAdagrad: maximize is not supported")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize, foreach=None))
        # As torch: the state exists from the start, so it is saved even before a step.
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["step"] = torch.tensor(0.0)
                state["sum"] = torch.full(param.shape, initial_accumulator_value,
                                          dtype=torch.float32)

    def _update(self, group: Dict[str, Any], state: State, master: torch.Tensor,
                grad: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
        skipped = _kernels.adagrad_step(master, _fp32_state(state, "sum", master),
                                        grad.contiguous(), _step_count(state) + 1, group["lr"],
                                        group["lr_decay"], group["weight_decay"], group["eps"],
                                        out)
        if not skipped:
            _advance_step(state)
        return skipped


__all__ = ["CPUAdam", "CPUAdamW", "CPUAdagrad", "CPUSGD"]
