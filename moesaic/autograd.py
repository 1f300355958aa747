"""``first_order``: the backward of a Function whose gradient is not itself differentiable;
``in_backward``: whether a forward runs inside a backward (a checkpoint's recomputation);
``fresh``: a Function's output that torch.compile differentiates correctly.

torch's ``once_differentiable`` errors only when a later backward happens to run through its
error node; a second derivative taken with ``inputs=`` or ``autograd.grad`` can skip that node
and silently miss this part of the curvature. ``first_order`` refuses at once instead: a backward
run with ``create_graph=True`` (grad mode on inside the backward) raises, naming the op.
"""
from __future__ import annotations

import functools

import torch


def in_backward() -> bool:
    """True while autograd runs a backward, e.g. a checkpoint's recomputed forward."""
    return torch._C._current_graph_task_id() != -1


def first_order(backward):
    """Decorate a ``torch.autograd.Function.backward`` that supports first derivatives only."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{backward.__qualname__.split('.')[0]} (moesaic MoE layer) has first-order "
                "gradients only: a backward with create_graph=True (second derivatives, e.g. a "
                "gradient penalty through the layer) is not supported")
        return backward(ctx, *grads)

    return wrapped


_COPY_UNDER_COMPILE = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)


def fresh(out: torch.Tensor) -> torch.Tensor:
    """A custom Function's output, copied while torch.compile traces the forward on torch
    older than 2.13.

    torch 2.11's dynamo gives zero gradients through a ``torch.autograd.Function`` whose
    forward returns a tensor it wrote in place (``add_``, ``index_add_``, ``out=``, a Triton
    kernel's output), with every backend, ``"eager"`` included; torch 2.13 does not, so there
    (and in eager mode on any version) this returns ``out`` itself.
    """
    return out.clone() if _COPY_UNDER_COMPILE and torch.compiler.is_compiling() else out
