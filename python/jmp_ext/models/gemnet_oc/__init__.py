"""GemNet-OC as JMP uses it: config, backbone and its building blocks."""

from jmp_ext.models.gemnet_oc.backbone import GemNetOCBackbone
from jmp_ext.models.gemnet_oc.config import BackboneConfig
from jmp_ext.models.gemnet_oc.scaling import ScaleFactor, fit_scale_factors

__all__ = ["BackboneConfig", "GemNetOCBackbone", "ScaleFactor", "fit_scale_factors"]
