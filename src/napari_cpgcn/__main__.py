"""``python -m napari_cpgcn``: the ``napari-cpgcn`` command."""

import sys

from napari_cpgcn.cli import main

sys.exit(main())
