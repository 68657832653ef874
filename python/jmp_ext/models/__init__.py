"""Models: GemNet-OC backbone (jmp_ext.models.gemnet_oc), heads, whole networks, checkpoints."""

from jmp_ext.models.checkpoint import load_jmp_checkpoint, read_state_dict
from jmp_ext.models.gemnet_oc import BackboneConfig, GemNetOCBackbone, ScaleFactor, fit_scale_factors
from jmp_ext.models.heads import HeadConfig
from jmp_ext.models.network import AtomEmbedding, FinetuneModel, PretrainModel

__all__ = ["AtomEmbedding", "BackboneConfig", "FinetuneModel", "GemNetOCBackbone", "HeadConfig", "PretrainModel",
           "ScaleFactor", "fit_scale_factors", "load_jmp_checkpoint", "read_state_dict"]
