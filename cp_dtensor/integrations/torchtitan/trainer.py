"""The entry point's trainer: torchtitan's ``Trainer`` with one method changed, for documents under CP.

torchtitan's ``post_dataloading_process`` builds the attention masks from the whole rows and then hands
them to ``cp_shard``, which takes a FlexAttention ``BlockMask`` only
(``torchtitan/distributed/context_parallel.py``: ``assert isinstance(attention_masks, (BlockMask, ...))``).
For ``block_causal`` flavors served by cp_dtensor the masks are document ids, which CP does not shard: every
rank needs the ids of the whole rows (Note [block_causal with cp_dtensor]). So under CP this trainer builds
them first, lets torchtitan shard tokens, labels and positions without them, and passes them unsharded.
Everything else is torchtitan's, and without documents or without CP the method is torchtitan's too.

This module imports ``torchtitan.train``; :func:`~cp_dtensor.integrations.torchtitan.main` imports it after
the CPU fixes.
"""

from __future__ import annotations

from typing import Any

import torch
from torchtitan.distributed.context_parallel import prepare_context_parallel_input
from torchtitan.train import Trainer as TorchtitanTrainer

from cp_dtensor.integrations.torchtitan.documents import uses_document_ids

__all__ = ["Trainer"]


class Trainer(TorchtitanTrainer):
    """torchtitan's ``Trainer``; under CP the document ids of ``block_causal`` flavors reach the model whole."""

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """torchtitan's method; for ``block_causal`` under CP the ids are built from the whole rows first.

        Returns:
            ``(inputs, labels, extra_inputs, extra_kwargs)`` as torchtitan's: inputs, labels and
            ``extra_kwargs["positions"]`` this rank's CP shards (torchtitan's load balancer),
            ``extra_kwargs["attention_masks"]`` the (B, S) document ids of the whole rows.
        """
        if not (self.parallel_dims.cp_enabled and uses_document_ids(self.model_args)):
            return super().post_dataloading_process(input_dict, labels)
        inputs = input_dict["input"]  # (B, S) whole rows
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        document_ids = self.model_parts[0].get_attention_masks(
            input_batch=inputs, tokenizer=self.tokenizer, extra_inputs=extra_inputs
        )  # (B, S)
        inputs, labels, extra_kwargs = prepare_context_parallel_input(
            inputs,
            labels,
            {},  # no mask for cp_shard: it takes BlockMasks only
            self.parallel_dims.get_mesh("cp"),
            self.device,
            self.job_config.parallelism.context_parallel_load_balancer,
        )  # (B, S / cp) each, and extra_kwargs["positions"] (B, S / cp)
        extra_kwargs["attention_masks"] = document_ids  # whole rows: the same on every CP rank
        return inputs, labels, extra_inputs, extra_kwargs
