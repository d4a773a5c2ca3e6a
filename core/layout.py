"""Layout constants of the stored local rows, shared by extractors, the store and re-rankers.

Every stored local descriptor row is ``[x, y, mask, scale_id, weight, d_0 ... d_{D-1}]``: five
metadata columns in front of the descriptor (reference-spec §1.3, the official AMES files).
"""

NUM_META = 5  # metadata columns in front of every stored descriptor

# Files of an extraction folder (``locore extract --out``): the local store and the raw float32
# globals, one row per committed image in store order.
LOCAL_FILE = "local.h5"
GLOBAL_FILE = "global.f32"
