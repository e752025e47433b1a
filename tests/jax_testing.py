"""Helpers for tests that run models: forwards under jit (an eager forward compiles one program
per operation)."""

import functools

import jax


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, *inputs):
    return model.apply(variables, *inputs)


def jit_apply(model, variables, *inputs, **kwargs):
    """`model.apply(variables, *inputs, **kwargs)` jitted, its outputs fetched to numpy (so that
    indexing them compiles nothing). Without kwargs the program is compiled once per model config
    and input shapes (Flax modules hash by their fields), so equal models share it."""
    if kwargs:
        return jax.device_get(
            jax.jit(lambda v, *x: model.apply(v, *x, **kwargs))(variables, *inputs)
        )
    return jax.device_get(_apply(model, variables, *inputs))
