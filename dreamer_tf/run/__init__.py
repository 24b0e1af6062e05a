"""Running Dreamer: collection (`collect`), the training loop (`loop`), the run directory
(`logdir`), checkpoints, logging, videos and scoring a saved agent (`score`). Importing this package
does not import TensorFlow; the loop imports it when a run is built."""
