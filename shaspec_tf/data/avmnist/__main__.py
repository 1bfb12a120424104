"""``python -m shaspec_tf.data.avmnist OUT_DIR ...``: see :func:`shaspec_tf.data.avmnist.cli.main`."""
import sys

from shaspec_tf.data.avmnist.cli import main

sys.exit(main())
