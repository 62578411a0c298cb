"""Input data: `sources` (files, hub, TFDS) -> `batching` (length buckets, plans, per-host rows,
resumable iterators) -> per-objective formatting (`pipeline`: text classification; `instruct`:
instruction tuning)."""
