"""S4 / S4D sequence models: conv-mode training, verified recurrent serving form."""

from model.arch import build
from model.checkpoint import load, save
from model.network import ModelConfig, SequenceModel
from model.recurrent import RecurrentModel, VerificationError

__all__ = ["ModelConfig", "SequenceModel", "RecurrentModel", "VerificationError", "build", "load", "save"]
