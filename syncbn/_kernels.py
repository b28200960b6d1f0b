"""syncbn._kernels: the compiled kernels (see _kernels_body.pxi and _kernels.pyi).

This module replaces itself, in sys.modules, with the extension of the kernel
variant that syncbn/_variants.py chose for this CPU, so ``syncbn._kernels`` is
that extension module and ``from syncbn._kernels import REFINE`` takes its
names.
"""

import importlib
import sys

from ._variants import CHOICE, module_name

sys.modules[__name__] = importlib.import_module(module_name(CHOICE.variant))
