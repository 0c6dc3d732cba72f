"""Using a finished run: classifier exports, merged/adapter/ONNX exports, WiSE-FT mixtures of run weights,
prediction and HTML reports.

May import: everything up to `training` (layer 6); not `continual` or `commands`.
"""
