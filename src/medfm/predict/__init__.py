"""Batch prediction (`medfm predict`): a classifier, encoder or exported model over files, folders and
prepared datasets, into a de-identified, resumable results table."""

from medfm.predict.model import Predictor, load_predictor
from medfm.predict.run import predict

__all__ = ["Predictor", "load_predictor", "predict"]
