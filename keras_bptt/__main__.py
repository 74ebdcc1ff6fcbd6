"""`python -m keras_bptt`: the `keras-bptt` command line (`keras_bptt.cli`)."""

import sys

from keras_bptt import cli

sys.exit(cli.main())
