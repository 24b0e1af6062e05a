"""The agent of the paper: the world-model objective (`world_model`), behaviour learning by latent
imagination (`behavior`), exploration (`explore`), and `Dreamer`, which ties them together with the
optimisers into one compiled train step and a policy (`dreamer`). Imports TensorFlow."""
from dreamer_tf.agent.dreamer import METRIC_KEYS, Dreamer

__all__ = ["Dreamer", "METRIC_KEYS"]
