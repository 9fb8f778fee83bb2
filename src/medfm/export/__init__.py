"""Export of medfm runs for deployment: ONNX (dynamic batch, 2D and 3D), int8 quantisation with onnxruntime,
and an onnxruntime session that runs the exported folder (``medfm export RUN --to DIR``).

- :func:`medfm.export.run.export_run`: a classifier or encoder run -> a self-describing folder.
- :func:`medfm.export.session.load_exported`: that folder -> an object with ``.run(x)`` and ``.config``.
"""

from medfm.export.run import EXPORTABLE, export_run
from medfm.export.session import ExportedModel, load_exported

__all__ = ["EXPORTABLE", "ExportedModel", "export_run", "load_exported"]
