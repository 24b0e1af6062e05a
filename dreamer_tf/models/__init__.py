"""The networks of the paper: the RSSM (`rssm`), encoders, decoders and heads (`networks`), and the
action and prediction distributions (`distributions`). Imports TensorFlow."""
from dreamer_tf.models.distributions import OneHotDist, TanhNormal
from dreamer_tf.models.networks import (IMAGE_SHAPE, MLP, ActionHead, ConvDecoder, ConvEncoder, DenseHead,
                                        Initializers, StateDecoder, StateEncoder, StateModel, dtype_policy,
                                        preprocess_image)
from dreamer_tf.models.rssm import RSSM, STATE_KEYS

__all__ = ["RSSM", "STATE_KEYS", "MLP", "ConvEncoder", "ConvDecoder", "DenseHead", "ActionHead", "StateModel",
           "StateEncoder", "StateDecoder", "Initializers", "dtype_policy", "preprocess_image", "IMAGE_SHAPE", "TanhNormal", "OneHotDist"]
