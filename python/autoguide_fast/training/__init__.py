"""EDM2 training: the loss (:mod:`.loss`), the run's options (:mod:`.options`), what each step
reads (:mod:`.batches`), the run folder's files (:mod:`.state`) and the loop (:mod:`.loop`)."""

from .batches import STREAM_BYTES, stability_encoder
from .loop import train
from .loss import edm2_loss, learning_rate
from .options import TrainOptions, preset_defaults
from .state import SNAPSHOT_PREFIX, STATE_PREFIX, rank_zero, read_stats

__all__ = [
    "SNAPSHOT_PREFIX",
    "STATE_PREFIX",
    "STREAM_BYTES",
    "TrainOptions",
    "edm2_loss",
    "learning_rate",
    "preset_defaults",
    "rank_zero",
    "read_stats",
    "stability_encoder",
    "train",
]
