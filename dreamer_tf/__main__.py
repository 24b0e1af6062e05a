import sys
from dreamer_tf.cli import main

sys.exit(main())
