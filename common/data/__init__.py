"""Data layer: label schemes, dataset layouts (write/detect/read), datalists with folds, MONAI transforms.

``common.data.transforms`` imports MONAI/torch and is therefore not imported here.
"""

from common.data.labels import (  # noqa: F401
    SCHEMES,
    LabelScheme,
    check_labels,
    convert_labels,
    get_scheme,
    region_channels,
    regions,
    tumor_mask,
)
from common.data.layouts import (  # noqa: F401
    LAYOUTS,
    detect_layout,
    get_layout,
    layout_label_scheme,
    make_case_id,
    read_layout,
    write_case,
)
from common.data.datalist import (  # noqa: F401
    build_datalist,
    case_problems,
    load_datalist,
    validate_case,
)
