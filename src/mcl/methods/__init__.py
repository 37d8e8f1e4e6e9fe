"""LightningModules: one small file per method on top of :mod:`mcl.methods.base`."""

from mcl.methods.base import MultiLevelModule
from mcl.methods.mcl import MCL
from mcl.methods.supervised import SupervisedMultiLevel

__all__ = ["MCL", "MultiLevelModule", "SupervisedMultiLevel"]
