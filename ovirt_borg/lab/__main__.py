"""``python -m ovirt_borg.lab``: the same as the ``ovirt-borg-lab`` command."""

import sys

from ovirt_borg.lab.cli import main

sys.exit(main())
