"""Training: schedules and optimisers (backend-agnostic) and the ``shaspec train`` loop (TF data input)."""
from shaspec_tf.training.schedules import PolyDecay, make_optimizer, make_schedule

__all__ = ["PolyDecay", "make_optimizer", "make_schedule"]
