"""MONAI Deploy apps for the collection's serving tasks (run them with the deploy env: ``make deploy-env``).

``app.py``: NIfTI in -> NIfTI out for every task of :mod:`common.bundle.serve`. ``app_dicom_impute.py``: a DICOM MR
series in -> the imputed contrast as a new, clearly synthetic DICOM series. Both check the request first and only
then import :mod:`tools.deploy.graphs` (the Holoscan apps; imports MONAI and the SDK), built from
:mod:`tools.deploy.operators`. :mod:`tools.deploy.dicom` holds the DICOM <-> NIfTI geometry (pydicom only).
"""
