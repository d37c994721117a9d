"""``python -m DOSnet``: the upstream training protocol (see DOSnet/protocol.py)."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from DOSnet.protocol import main  # noqa: E402

sys.exit(main())
