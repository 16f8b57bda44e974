"""The model registry: one frozen :class:`ModelSpec` per model family, looked up by ``model.name``.

Note [Model registry]
~~~~~~~~~~~~~~~~~~~~~
Like torchtitan's ``TrainSpec``, a family is one object that says everything the trainer needs to know
about it; the trainer itself names no family::

    model.name ("llama3") -> get_model_spec -> ModelSpec
      .model_args(flavor, options)   flavor table (or "hf": config.json through hf_adapter) + job options
      .build(args)                   plain model on the current device (meta in the trainer)
      .parallelize(model, dims, ...) TP -> CP -> AC -> compile -> FSDP of one model part
      .pipeline_split(model, dims, stages_per_rank)   this pp rank's stages (None: no pipelining)
      .hf_adapter                    HuggingFace config / state-dict conversion (None: no HF checkpoints)

A new family is one module that builds a spec and calls :func:`register_model`; nothing in the library
changes (``tests/test_model_registry.py`` registers one from the test file and trains it). The built-in
families (``llama3``, ``qwen3``, ``torchtitan.llama3``) register when ``cp_dtensor.models`` is imported;
``torchtitan.llama3`` imports torchtitan only when it is used.

Layers: a family's spec binds functions of ``cp_dtensor.parallelize`` / ``cp_dtensor.pipeline`` (which
know module names, not model classes), so the specs sit above them and the trainer above the specs; the
model modules themselves (``modules``, ``rope``, ``args``) import neither.

The registry is a process-wide table (as torchtitan's): it holds families, not options, and registering a
name twice with another spec is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.rope import RopeOverrides

__all__ = [
    "HF_FLAVOR",
    "ModelOptions",
    "ModelSpec",
    "apply_job_options",
    "get_model_spec",
    "hf_architectures",
    "model_names",
    "register_model",
]

HF_FLAVOR = "hf"
"""``model.flavor`` that takes the architecture from ``model.hf_assets_path``/config.json."""


@dataclass(frozen=True)
class ModelOptions:
    """The job's settings that a family applies to a flavor's args (from the ``[model]`` config section).

    Attributes:
        attention_mask: ``"causal"``, ``"bidirectional"`` or ``"document_causal"``.
        sliding_window: Window of the local layers in tokens (0 = none).
        sliding_window_layers: ``"all"`` or ``"alternate"``.
        seq_len: Training sequence length (0 = unknown); dynamic RoPE scales for it.
        hf_assets_path: Folder with the HuggingFace config.json (flavor ``"hf"``).
        rope: RoPE settings that replace the flavor's / config.json's (context extension).
    """

    attention_mask: str = "causal"
    sliding_window: int = 0
    sliding_window_layers: str = "all"
    seq_len: int = 0
    hf_assets_path: str = ""
    rope: RopeOverrides = field(default_factory=RopeOverrides)


def apply_job_options(args: ModelArgs, options: ModelOptions) -> ModelArgs:
    """The default way a family applies :class:`ModelOptions`: mask, window, RoPE overrides, dynamic length.

    Args:
        args: The flavor's (or config.json's) args.
        options: The job's settings.

    Returns:
        New args.
    """
    theta, scaling, max_seq_len = options.rope.apply(args.rope_theta, args.rope_scaling, args.max_seq_len)
    if options.seq_len:
        scaling = scaling.with_dynamic_seq_len(options.seq_len)
    return replace(
        args,
        causal=options.attention_mask != "bidirectional",
        sliding_window=options.sliding_window,
        sliding_window_layers=options.sliding_window_layers,
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_seq_len,
    )


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer needs to know about one model family (Note [Model registry]).

    Attributes:
        name: The ``model.name`` that selects it, e.g. ``"llama3"``.
        flavors: ``{flavor: ModelArgs}``, or a function returning it (for families whose table needs an
            optional import).
        build: ``build(args) -> nn.Module``: the plain model on the current default device. The module must
            take ``forward(tokens, positions=None, document_ids=None, rope_positions=None)``, have
            ``init_weights(seed)`` (and ``init_buffers()`` to load checkpoints after ``to_empty``), hold
            its :class:`ModelArgs` as ``args``, and keep its blocks in ``layers`` (FSDP wraps each).
        parallelize: ``parallelize(model, parallel_dims, **settings)`` applies TP, CP, AC, compile and FSDP to
            one model part in place and returns the CP attention object or None (the keyword settings are
            those of :func:`cp_dtensor.parallelize.parallelize_llama`).
        pipeline_split: ``pipeline_split(model, parallel_dims, stages_per_rank)`` returns this pp rank's
            ``(stage index, module)`` pairs; None: the family does not support pipeline parallelism.
        hf_adapter: Conversion from and to HuggingFace checkpoints
            (:class:`cp_dtensor.models.hf.HFAdapter`); None: no HF checkpoints.
        apply_options: ``apply_options(args, options) -> args``: applies the job's settings (and refuses
            those the family cannot serve, with a ValueError naming the setting).
        description: One line for the config reference.
        flavor_note: Appended to the unknown-flavor message (which flavors are offered, and why).
    """

    name: str
    flavors: Mapping[str, ModelArgs] | Callable[[], Mapping[str, ModelArgs]]
    build: Callable[[ModelArgs], nn.Module]
    parallelize: Callable[..., Any]
    pipeline_split: Callable[..., list[tuple[int, nn.Module]]] | None = None
    hf_adapter: Any = None
    apply_options: Callable[[ModelArgs, ModelOptions], ModelArgs] = apply_job_options
    description: str = ""
    flavor_note: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")

    def flavor_table(self) -> Mapping[str, ModelArgs]:
        """``{flavor: args}`` (calls ``flavors`` when it is a function)."""
        return self.flavors() if callable(self.flavors) else self.flavors

    def flavor_names(self) -> list[str]:
        """The flavors this family accepts, ``"hf"`` included when it reads HuggingFace configs."""
        names = sorted(self.flavor_table())
        return [*names, HF_FLAVOR] if self.hf_adapter is not None else names

    def model_args(self, flavor: str, options: ModelOptions | None = None) -> ModelArgs:
        """The args of ``flavor`` with the job's ``options`` applied.

        Args:
            flavor: A key of the flavor table, or ``"hf"`` (config.json at ``options.hf_assets_path``).
            options: The job's settings; None applies the defaults.

        Returns:
            The model args.

        Raises:
            ValueError: An unknown flavor (the message lists the known ones), ``"hf"`` without an adapter
                or without ``hf_assets_path``, or what ``apply_options`` refuses.
        """
        options = options or ModelOptions()
        if flavor == HF_FLAVOR and self.hf_adapter is not None:
            if not options.hf_assets_path:
                raise ValueError(
                    f'model.flavor "hf" reads the architecture from model.hf_assets_path, which is not set; '
                    f"set it to a folder with config.json (model.name {self.name!r})."
                )
            args = self.hf_adapter.read_model_args(options.hf_assets_path, family=self.name)
        else:
            table = self.flavor_table()
            if flavor not in table:
                note = f" ({self.flavor_note})" if self.flavor_note else ""
                raise ValueError(
                    f"model.flavor {flavor!r} is unknown for model.name {self.name!r}; choose one of "
                    f"{self.flavor_names()}{note}."
                )
            args = table[flavor]
        return self.apply_options(args, options)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` selectable as ``model.name = spec.name``.

    Registering the same spec again is a no-op (module re-imports); another spec under a taken name is an
    error.

    Args:
        spec: The family.

    Returns:
        ``spec`` (so a module can write ``SPEC = register_model(ModelSpec(...))``).

    Raises:
        ValueError: ``spec.name`` is registered with a different spec.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(
            f"model name {spec.name!r} is already registered (by {known.build!r}); pick another name for "
            f"this family"
        )
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> list[str]:
    """The registered ``model.name`` values, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``.

    Args:
        name: A ``model.name``.

    Returns:
        The spec.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        names = ", ".join(f'"{n}"' for n in model_names())
        raise ValueError(
            f"model.name {name!r} is not a registered model family; choose one of {names} (or register one "
            f"with cp_dtensor.models.register_model)."
        )
    return spec


def hf_architectures() -> dict[str, str]:
    """``{HuggingFace architecture: model.name}`` of the registered families that read HF checkpoints."""
    return {
        spec.hf_adapter.architecture: name
        for name, spec in sorted(_REGISTRY.items())
        if spec.hf_adapter is not None
    }
