"""Models: GemNet-OC backbone (jmp_ext.models.gemnet_oc), heads, whole networks, checkpoints."""

from jmp_ext.models.gemnet_oc import BackboneConfig, GemNetOCBackbone, ScaleFactor, fit_scale_factors

__all__ = ["BackboneConfig", "GemNetOCBackbone", "ScaleFactor", "fit_scale_factors"]
