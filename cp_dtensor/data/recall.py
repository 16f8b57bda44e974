"""The synthetic long-range recall task: answers far from their cues, generated per index (no files)."""

from __future__ import annotations

import math

import torch

from cp_dtensor.data.common import IGNORE_INDEX, Sample, _mix_seed, document_positions

__all__ = ["SyntheticRecallDataset"]


class SyntheticRecallDataset:
    """Synthetic task whose answers sit far from their cues: solvable only by attending across the sequence.

    Note [Synthetic recall sample]
    ------------------------------
    Token ids are split into disjoint ranges below `vocab_size`:
    `filler [0, F) | keys [F, F+K) | values [F+K, F+K+V') | query marker F+K+V'`.
    The cue sits inside the cue region, `int(cue_fraction * seq_len)` positions from `cue_start =
    int(cue_start_fraction * seq_len)` on (the first 10% by default), each cue written `cue_repeats` times at
    random distinct places; random filler fills everything else up to one query marker, after which the last
    `num_queries` positions are the queries. Only query positions have labels (the recalled value); all
    other labels are -100. The answer is never in the input at or after a query, so the task is the same for
    causal and bidirectional models, and it needs attention from the queries back to the cue region (~90% of
    the sequence by default). Under context parallelism it crosses ranks only if the cue region lies on
    another CP rank than the queries: with the zigzag layout the first chunk belongs to the rank that holds
    the last one, so the trainer starts the cue region at `cue_start_fraction = 0.25` (Note [Recall across
    CP ranks] in `cp_dtensor/trainer/builders.py`).

    `variant="copy"` (default; one hop, K = 0, V' = num_values): one value, the queries are query markers.

    ```
    position  0 ... cue_start ...       cue_end             ...        S-Q-1   S-Q  ...  S-1
    tokens    f ... f  v  f  f  v  f  v  f | f  f  f  f  f  f  ...  f  f   ?       ?    ...  ?
    labels    . ... .  .  .  .  .  .  .  . | .  .  .  .  .  .  ...  .  .   .       v    ...  v
    ```

    `variant="keyed"` (one hop, several answers): `num_pairs` distinct keys, each key k owning its own value
    sub-range of `num_values` ids (V' = K * num_values); the cue holds one value of each chosen key, the
    queries are keys (distinct, random order) labelled with their key's value.

    ```
    tokens    f  v2 f  v1 v2 f  v1 f | f  f  ...  f  ?   k1   k2
    labels    .  .  .  .  .  .  .  . | .  .  ...  .  .   v1   v2        (v1 from k1's sub-range, ...)
    ```

    `variant="pairs"` (associative recall, two hops): the cue holds adjacent (key, value) pairs with values
    drawn from one shared range (V' = num_values); a query key is labelled with the value that followed it.
    Solving it needs an induction circuit (a previous-token head, then a content match), which a 2-layer
    model learns far more slowly than the one-hop variants.

    ```
    tokens    f  k1 v1 f  k2 v2 k1 v1 | f  f  ...  f  ?   k2   k1
    labels    .  .  .  .  .  .  .  .  | .  .  ...  .  .   v2   v1
    (f filler, k key, v value, ? query marker, . = -100, | = cue_end)
    ```

    Sample i is a pure function of (seed, i) and the constructor arguments. `chance_loss = ln(num_values)`
    is the loss of a uniform guess among the possible answers, i.e. what a model reaches without long-range
    attention.

    `documents` sets the sample's `document_ids` (tokens, labels and positions do not depend on it):
    `"same"` (default) makes the sample one document (all ids 0); `"split"` makes it two, cut at `cue_end`
    (`split_position`): document 0 holds the cue region, document 1 the filler after it, the query marker
    and the queries. Under a `document_causal` mask the queries then cannot see their cue, so a model stays
    at `chance_loss`: the control of a cross-document recall experiment.

    ```
    tokens          f ... f  v  f  v  f  v | f  f  ...  f  ?   ?  ...  ?
    document_ids    0 ... 0  0  0  0  0  0 | 1  1  ...  1  1   1  ...  1      ("split"; | = cue_end)
    ```

    Measured (debug flavor, single process, 1 CPU thread, AdamW lr 1e-3, grad clip 1, seq_len 256, global
    batch 8, default arguments otherwise; loss = mean over the 10 previous steps, chance = ln 16 = 2.77):

    | variant | step 50 | step 100 | step 150 | step 300 | time to step 150 |
    |---------|---------|----------|----------|----------|------------------|
    | copy    | 3.25    | 2.25     | 0.19     |          | 12 s             |
    | keyed   | 3.84    | 3.08     | 2.67     | 0.63     | 13 s             |
    | pairs   |         | 2.85     |          | 2.76     | 14 s             |

    (copy, seeds 0/1/2: 0.19 / 0.05 / 0.09 at step 150.) Only "copy" meets "< 50% of chance in 150 steps";
    "pairs" stays at chance for 300 steps with the 2-layer debug model.

    Args:
        seq_len: Tokens per sample.
        vocab_size: Model vocabulary size; all ranges must fit below it.
        seed: Dataset seed.
        variant: "copy", "keyed" or "pairs" (see the Note).
        num_pairs: Number of cues per sample ("keyed", "pairs"; None means 4; "copy" has exactly 1).
        num_queries: Query positions at the end of each sample ("keyed", "pairs": at most `num_pairs`).
        num_keys: Size of the key range ("copy" has none; None means `num_pairs` for "keyed", 16 for
            "pairs").
        num_values: Possible answers per query (sets `chance_loss`).
        num_filler: Size of the filler range; None takes the ids left below `vocab_size`, at most 256.
        cue_fraction: The cue region is `int(cue_fraction * seq_len)` positions long.
        cue_start_fraction: The cue region starts at position `int(cue_start_fraction * seq_len)` (0: the
            first positions, as before this option existed).
        cue_repeats: How many times each cue is written (more copies make the task easier to learn); None means
            4 for "copy" and "keyed", 1 for "pairs".
        num_samples: `len(self)`; samples are generated on demand, nothing is stored.
        documents: "same" (one document per sample) or "split" (cue and queries in two documents); see above.
        reset_positions: Positions restart at 0 at each document start (the second "split" document's
            positions count from `cue_end`); else `arange(seq_len)`.

    Raises:
        ValueError: For an unknown variant or `documents`, ranges that do not fit in `vocab_size`, or a
            `seq_len` too short for the cue region (from its start), the query marker and the queries.
    """

    VARIANTS = ("copy", "keyed", "pairs")
    DOCUMENTS = ("same", "split")

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        seed: int = 0,
        *,
        variant: str = "copy",
        num_pairs: int | None = None,
        num_queries: int = 4,
        num_keys: int | None = None,
        num_values: int = 16,
        num_filler: int | None = None,
        cue_fraction: float = 0.1,
        cue_start_fraction: float = 0.0,
        cue_repeats: int | None = None,
        num_samples: int = 1 << 20,
        documents: str = "same",
        reset_positions: bool = False,
    ) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if documents not in self.DOCUMENTS:
            raise ValueError(
                f"SyntheticRecallDataset: documents must be one of {self.DOCUMENTS}, got {documents!r}"
            )
        if variant == "copy":
            if num_pairs not in (None, 1) or num_keys not in (None, 0):
                raise ValueError(
                    f"variant 'copy' has one cue and no keys; got num_pairs={num_pairs}, num_keys={num_keys} "
                    f"(use variant 'keyed' or 'pairs' for several cues)"
                )
            num_pairs, num_keys = 1, 0
        else:
            num_pairs = 4 if num_pairs is None else num_pairs
            if num_keys is None:
                num_keys = num_pairs if variant == "keyed" else 16
        if cue_repeats is None:
            cue_repeats = 1 if variant == "pairs" else 4
        for name, value in (
            ("seq_len", seq_len),
            ("num_pairs", num_pairs),
            ("num_queries", num_queries),
            ("num_values", num_values),
            ("cue_repeats", cue_repeats),
            ("num_samples", num_samples),
        ):
            if value <= 0:
                raise ValueError(f"SyntheticRecallDataset: {name} must be positive, got {value}")
        if variant != "copy":
            if num_pairs > num_keys:
                raise ValueError(
                    f"num_pairs={num_pairs} needs as many distinct keys, but num_keys={num_keys}"
                )
            if num_queries > num_pairs:
                raise ValueError(
                    f"num_queries={num_queries} must be <= num_pairs={num_pairs} (one query per cue)"
                )
        value_ids = num_keys * num_values if variant == "keyed" else num_values
        special = num_keys + value_ids + 1
        if num_filler is None:
            num_filler = min(256, vocab_size - special)
        if num_filler <= 0 or num_filler + special > vocab_size:
            raise ValueError(
                f"token ranges do not fit: num_filler={num_filler} + {num_keys} keys + {value_ids} value ids + "
                f"1 query marker = {num_filler + special} > vocab_size={vocab_size}; raise vocab_size or shrink "
                f"the ranges"
            )
        if not 0.0 <= cue_start_fraction < 1.0:
            raise ValueError(
                f"SyntheticRecallDataset: cue_start_fraction must be in [0, 1), got {cue_start_fraction}"
            )
        cue_start = int(cue_start_fraction * seq_len)
        cue_len = int(cue_fraction * seq_len)
        cue_end = cue_start + cue_len
        cue_width = 2 if variant == "pairs" else 1  # positions one written cue takes
        needed = num_pairs * cue_repeats * cue_width
        if cue_len < needed:
            raise ValueError(
                f"the cue region ({cue_len} positions = cue_fraction {cue_fraction} x seq_len {seq_len}) "
                f"cannot hold {num_pairs} cue(s) x {cue_repeats} repeats x {cue_width} positions = {needed}; "
                f"raise seq_len or cue_fraction, or lower num_pairs or cue_repeats"
            )
        if cue_end + 1 + num_queries > seq_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for the cue region (positions {cue_start}..{cue_end - 1}), "
                f"1 query marker and {num_queries} queries; use seq_len >= {cue_end + 1 + num_queries} or a "
                f"smaller cue_start_fraction"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.variant = variant
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.num_values = num_values
        self.cue_repeats = cue_repeats
        self.cue_start = cue_start
        self.cue_end = cue_end
        self.num_samples = num_samples
        self.documents = documents
        self.reset_positions = reset_positions
        self.filler_range = (0, num_filler)
        self.key_range = (num_filler, num_filler + num_keys)
        self.value_range = (num_filler + num_keys, num_filler + num_keys + value_ids)
        self.query_marker = num_filler + num_keys + value_ids

    @property
    def chance_loss(self) -> float:
        """ln(num_values): the loss of a uniform guess among the possible answers of a query."""
        return math.log(self.num_values)

    @property
    def split_position(self) -> int | None:
        """First position of the second document for `documents="split"` (`cue_end`); None for "same"."""
        return self.cue_end if self.documents == "split" else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        """Sample `index` (a pure function of seed and index).

        Args:
            index: In [0, len(self)).

        Returns:
            `{"tokens", "labels", "positions", "document_ids"}`, each (seq_len,) int64.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for a dataset of {self.num_samples} samples")
        gen = torch.Generator().manual_seed(_mix_seed("synthetic-recall", self.seed, index))
        seq, p, q, r = self.seq_len, self.num_pairs, self.num_queries, self.cue_repeats
        k_lo, k_hi = self.key_range
        v_lo = self.value_range[0]
        tokens = torch.randint(*self.filler_range, (seq,), generator=gen)  # (S,)
        labels = torch.full((seq,), IGNORE_INDEX, dtype=torch.int64)  # (S,)

        if self.variant == "copy":
            keys = torch.full((1,), self.query_marker, dtype=torch.int64)  # (1,) the query is the marker
        else:
            keys = k_lo + torch.randperm(k_hi - k_lo, generator=gen)[:p]  # (P,) distinct keys
        values = v_lo + torch.randint(0, self.num_values, (p,), generator=gen)  # (P,)
        if self.variant == "keyed":
            values += (keys - k_lo) * self.num_values  # each key's own sub-range

        if self.variant == "pairs":
            cue_len = self.cue_end - self.cue_start
            slots = (
                self.cue_start + 2 * torch.randperm(cue_len // 2, generator=gen)[: p * r]
            )  # (P*R,) even offsets
            tokens[slots] = keys.repeat(r)
            tokens[slots + 1] = values.repeat(r)
        else:
            slots = (
                self.cue_start + torch.randperm(self.cue_end - self.cue_start, generator=gen)[: p * r]
            )  # (P*R,)
            tokens[slots] = values.repeat(r)

        query_start = seq - q
        tokens[query_start - 1] = self.query_marker
        if self.variant == "copy":
            asked = torch.zeros(q, dtype=torch.int64)  # (Q,) every query asks the one cue
        else:
            asked = torch.randperm(p, generator=gen)[:q]  # (Q,) distinct cues in random order
        tokens[query_start:] = keys[asked]  # (Q,)
        labels[query_start:] = values[asked]  # (Q,)
        document_ids = torch.zeros(seq, dtype=torch.int64)  # (S,)
        if self.split_position is not None:
            document_ids[self.split_position :] = 1
        positions = (
            document_positions(document_ids) if self.reset_positions else torch.arange(seq, dtype=torch.int64)
        )  # (S,)
        return {"tokens": tokens, "labels": labels, "positions": positions, "document_ids": document_ids}
