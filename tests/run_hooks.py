"""Imported by test recipes (``imports:``) to watch a run from inside its processes, each of a DDP run's ranks
included (they import a recipe's modules too), or to kill it:

* ``SAE_ZOO_TEST_COUNTS=FOLDER``: each process writes ``FOLDER/rank-N.json`` at exit, with the training contexts it
  ran through the LM on the fly (``contexts``) and its LM forward passes for them (``passes``), and the training
  contexts it wrote to a cache (``cached_contexts``).
* ``SAE_ZOO_TEST_KILL_AT=STEP``: the process sends itself SIGKILL at the end of training step STEP, as a pre-empted
  job dies: nothing is cleaned up or flushed.
"""

import atexit
import json
import os
import signal
from pathlib import Path

from sae_zoo.data.activations import ActivationDataModule
from sae_zoo.model import SparseCoder

_COUNTS = {"contexts": 0, "passes": 0, "cached_contexts": 0}

if os.environ.get("SAE_ZOO_TEST_COUNTS") and not getattr(ActivationDataModule.live_rows, "counted", False):
    _live_rows = ActivationDataModule.live_rows

    def counted_live_rows(self, tokens):
        _COUNTS["contexts"] += len(tokens)
        _COUNTS["passes"] += -(-len(tokens) // self.hparams.model_batch_size)
        return _live_rows(self, tokens)

    counted_live_rows.counted = True
    ActivationDataModule.live_rows = counted_live_rows
    _write_shard = ActivationDataModule._write_shard

    def counted_write_shard(self, manifest, split, index, tokens):
        if split == "train":
            _COUNTS["cached_contexts"] += len(tokens)
        return _write_shard(self, manifest, split, index, tokens)

    ActivationDataModule._write_shard = counted_write_shard
    folder = Path(os.environ["SAE_ZOO_TEST_COUNTS"])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    atexit.register(lambda: (folder / f"rank-{rank}.json").write_text(json.dumps(_COUNTS)))

if os.environ.get("SAE_ZOO_TEST_KILL_AT") and not getattr(SparseCoder.on_train_batch_end, "kills", False):
    _end = SparseCoder.on_train_batch_end
    kill_at = int(os.environ["SAE_ZOO_TEST_KILL_AT"])

    def killing_end(self, outputs, batch, batch_idx):
        _end(self, outputs, batch, batch_idx)
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    killing_end.kills = True
    SparseCoder.on_train_batch_end = killing_end
