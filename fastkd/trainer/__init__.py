"""The distillation trainer: :class:`Distiller` plus its checkpoint, metrics, plotting and
distributed helpers. tqdm and matplotlib are imported only when a bar or a plot is made."""
from fastkd.trainer.checkpoint import atomic_save, load_checkpoint
from fastkd.trainer.distiller import Distiller
from fastkd.trainer.features import FeaturePair

__all__ = ["Distiller", "FeaturePair", "atomic_save", "load_checkpoint"]
