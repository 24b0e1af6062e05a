"""dreamer_tf: a TensorFlow 2 reproduction of Dreamer v1 (Hafner et al., ICLR 2020).

Importing the package does not import TensorFlow: environment worker processes import
`dreamer_tf.envs` and must stay TensorFlow-free (MuJoCo rendering crashes beside TF).
"""
__version__ = "0.1.0"
