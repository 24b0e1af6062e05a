"""dreamer_tf: a TensorFlow 2 reproduction of Dreamer v1 (Hafner et al., ICLR 2020).

Importing the package does not import TensorFlow: environment worker processes import
`dreamer_tf.envs` and must stay TensorFlow-free (MuJoCo rendering crashes beside TF).

It does turn TensorFlow's oneDNN kernels on for this process (unless the user set
TF_ENABLE_ONEDNN_OPTS): TensorFlow enables them by default only on CPUs with AVX-512 VNNI/BF16 or
AMX, and without them the convolutions' backward pass runs on one thread through Eigen on AVX2
CPUs (results/bench.md shows both settings). The variable must be set before TensorFlow is
imported, which every entry point (the CLI, `python -m dreamer_tf.train`, `import dreamer_tf...`)
does through this file.
"""
import os as _os

__version__ = "0.1.0"

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
