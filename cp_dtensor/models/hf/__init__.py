"""HuggingFace checkpoints for cp_dtensor's Llama-style families (Llama 3.x, Qwen3 dense).

* ``config``: config.json <-> :class:`~cp_dtensor.models.args.ModelArgs` (Note [RoPE in config.json])
* ``adapter``: parameter names and the q/k row permutation (Note [q/k permutation])
* ``safetensors_io``: sliced reads and bounded-size writes (Note [Reading only the local shard])
* ``pretrained``: ``from_pretrained`` / ``save_pretrained`` and the sharded load / save the trainer uses
  (Note [Loading a HuggingFace checkpoint into a sharded model])

Needs ``safetensors`` (the ``hf`` extra) when a checkpoint is read or written.
"""

from cp_dtensor.models.hf.adapter import (
    LLAMA_ADAPTER,
    QWEN3_ADAPTER,
    HFAdapter,
    clean_param_name,
    permute_from_hf,
    permute_to_hf,
)
from cp_dtensor.models.hf.config import (
    args_from_hf_config,
    hf_architecture,
    hf_config_from_args,
    read_hf_config,
    rope_from_hf_config,
)
from cp_dtensor.models.hf.pretrained import (
    adapter_for,
    check_hf_checkpoint,
    from_pretrained,
    load_hf_weights,
    save_hf_weights,
    save_pretrained,
    spec_for_hf_folder,
    write_hf_config,
)
from cp_dtensor.models.hf.safetensors_io import HFCheckpointReader, HFShardWriter, write_index

__all__ = [
    "LLAMA_ADAPTER",
    "QWEN3_ADAPTER",
    "HFAdapter",
    "HFCheckpointReader",
    "HFShardWriter",
    "adapter_for",
    "args_from_hf_config",
    "check_hf_checkpoint",
    "clean_param_name",
    "from_pretrained",
    "hf_architecture",
    "hf_config_from_args",
    "load_hf_weights",
    "permute_from_hf",
    "permute_to_hf",
    "read_hf_config",
    "rope_from_hf_config",
    "save_hf_weights",
    "save_pretrained",
    "spec_for_hf_folder",
    "write_hf_config",
    "write_index",
]
