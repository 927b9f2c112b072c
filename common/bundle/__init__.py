"""What bundle configs call: data resolution (phantoms made on first use), a bundle's own chains read through
``monai.bundle.ConfigParser``, and in-process bundle runs."""

from common.bundle.data import phantom_datalist, resolve_datalist, training_items
from common.bundle.prepare import bundle_config, prepare_cases
from common.bundle.run import run_bundle

__all__ = ["bundle_config", "phantom_datalist", "prepare_cases", "resolve_datalist", "run_bundle", "training_items"]
