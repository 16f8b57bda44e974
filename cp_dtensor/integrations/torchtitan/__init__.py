"""torchtitan with cp_dtensor: its trainer with our ring attention, and its Llama 3 model in our trainer.

Needs the extra: ``pip install "cp_dtensor[torchtitan]"`` (torchtitan >= 0.2.2, < 0.3: the last line with
TOML job configs). Nothing in torchtitan's installed files is edited.

Note [torchtitan integration]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torchtitan picks everything model-specific from a *train spec* named by ``[model] name``. This package's
spec is torchtitan's own Llama 3 spec (model code, flavors, pipelining, optimizer, LR schedule, loss,
validator, HF checkpoint adapter) with these parts replaced, one module each::

    torchrun ... -m cp_dtensor.integrations.torchtitan --job.config_file X.toml     (__main__ -> main)
      cpu_shims     CPU only: stub the triton-only MoE kernels, point torchtitan's device at the CPU
      train_spec    serve [model] name "cp_dtensor.llama3" and, from main, torchtitan's "llama3"
      trainer.Trainer  torchtitan's Trainer; one method changed, for block_causal under CP only
        post_dataloading_process   tokens, labels, positions -> local shards, "headtail" load balancer
                                   (rank r holds chunks r and 2cp-1-r: cp_dtensor's "zigzag" layout);
                                   block_causal: + document ids of the whole rows, unsharded
        model_cls, model_args      model: SeededLlama3, torchtitan's Transformer with an init that does
                                   not depend on the degrees (with debug.seed); block_causal flavors
                                   attend with cp_dtensor.document_attention (documents)
        parallelize_fn             parallelize: torchtitan's TP -> CP -> AC -> compile -> FSDP, with CP =
                                   parallelize_module(model, cp_mesh, {"layers.*.attention.inner_attention":
                                   cp_dtensor.ContextParallel(layout, comm, backend)}); gloo: plain-sum FSDP
        build_dataloader_fn        data: synthetic recall / local text (no download), else torchtitan's HF
        build_tokenizer_fn         data: bytes for "text" (its EOS id), None for the recall task, else
                                   torchtitan's HF tokenizer
        build_metrics_processor    metrics: torchtitan's, plus one JSON line per logged step
      config        the [cp_dtensor] section (comm, backend, log_file); defaults without custom_config_module
      model forward: every SDPA (or document_attention) inside attention.inner_attention -> cp_dtensor
                     ring op over "cp"

So torchtitan's PyTorch-experimental CP (its module-global dispatcher and rotate method, no CPU kernel) is
never switched on, and ``F.scaled_dot_product_attention`` is never patched.

The other direction: :class:`TorchtitanLlama3` (``model``) is torchtitan's Llama 3 ``Transformer`` with the
forward signatures of cp_dtensor's model, so cp_dtensor's trainer (``[model] name = "torchtitan.llama3"``)
drives it like its own model.

Each module's Note explains its part: Note [torchtitan on CPU] (``cpu_shims``), Note [cp_dtensor CP in
torchtitan's parallelize] (``parallelize``), Note [Seeded init of torchtitan's Llama 3] and Note
[torchtitan's Llama 3 in cp_dtensor's trainer] (``model``), Note [Train specs served] (``train_spec``),
Note [block_causal with cp_dtensor] (``documents``: torchtitan's packed-document flavors).
"""

# Import order matters: the triton stub (CPU fix 1) must be in place before torchtitan is first imported,
# and every module below imports torchtitan.
# ruff: noqa: E402

from cp_dtensor.integrations.torchtitan.cpu_shims import (
    configure_torchtitan_for_cpu,
    stub_moe_kernels_without_triton,
)

stub_moe_kernels_without_triton()

from cp_dtensor.integrations.torchtitan.compat import require_torchtitan

require_torchtitan()

from cp_dtensor.integrations.torchtitan.config import CPDTensorConfig, JobConfig
from cp_dtensor.integrations.torchtitan.data import (
    ByteTokenizerForTorchtitan,
    GlobalBatchDataLoader,
    build_dataloader,
    build_tokenizer,
)
from cp_dtensor.integrations.torchtitan.documents import (
    DocumentCausalAttention,
    DocumentCausalLlamaAttention,
    apply_document_attention,
    eos_document_ids,
    uses_document_ids,
)
from cp_dtensor.integrations.torchtitan.metrics import build_metrics_processor
from cp_dtensor.integrations.torchtitan.model import (
    Llama3Args,
    SeededLlama3,
    TorchtitanLlama3,
    build_torchtitan_llama3,
    build_torchtitan_llama3_from_args,
    torchtitan_llama3_args,
    torchtitan_llama3_flavors,
)
from cp_dtensor.integrations.torchtitan.parallelize import (
    apply_cp_dtensor,
    cp_layout_for_load_balancer,
    parallelize_llama,
)
from cp_dtensor.integrations.torchtitan.train_spec import (
    STOCK_TRAIN_SPEC_NAME,
    TRAIN_SPEC_NAME,
    get_train_spec,
    main,
    register_train_spec,
)

__all__ = [
    "STOCK_TRAIN_SPEC_NAME",
    "TRAIN_SPEC_NAME",
    "ByteTokenizerForTorchtitan",
    "CPDTensorConfig",
    "DocumentCausalAttention",
    "DocumentCausalLlamaAttention",
    "GlobalBatchDataLoader",
    "JobConfig",
    "Llama3Args",
    "SeededLlama3",
    "TorchtitanLlama3",
    "apply_cp_dtensor",
    "apply_document_attention",
    "build_dataloader",
    "build_metrics_processor",
    "build_tokenizer",
    "build_torchtitan_llama3",
    "build_torchtitan_llama3_from_args",
    "configure_torchtitan_for_cpu",
    "cp_layout_for_load_balancer",
    "eos_document_ids",
    "get_train_spec",
    "main",
    "parallelize_llama",
    "register_train_spec",
    "torchtitan_llama3_args",
    "torchtitan_llama3_flavors",
    "uses_document_ids",
]

register_train_spec()  # "cp_dtensor.llama3" (for -m torchtitan.train with experimental.custom_import)
