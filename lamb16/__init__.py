"""LAMB16: a LAMB optimizer for PyTorch with 16-bit (float8) adaptive state.

    from lamb16 import Lamb16
    optimizer = Lamb16(model.parameters(), lr=1e-2, weight_decay=1e-2)

`Lamb16` keeps Adam's two moments in float8 (2 bytes per parameter, against 8
for Adam or LAMB); `Lamb` is the float32 LAMB it derives from; `state_nbytes`
measures what an optimizer's state holds.
"""

from .lamb import Lamb
from .lamb16 import Lamb16
from .memory import state_nbytes

__all__ = ["Lamb", "Lamb16", "state_nbytes"]
__version__ = "0.1.0"
