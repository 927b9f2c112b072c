"""Infer tasks of the MONAI Label app (``tools/label_app``)."""
