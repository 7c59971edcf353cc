"""Models, registered with timm: AttentionViG (attentionvig_s/m/b), GreedyViG (greedyvig_s/m/b,
official checkpoints load) and the isotropic Vision GNN aggregation harness (vig_ti/s/b, official
ViG-Ti checkpoint loads); AttentionViG for dense prediction (a feature pyramid backbone
for torchvision's detection models, Semantic FPN)."""
from attvig_pyg.models.attentionvig import AttentionViG
from attvig_pyg.models import greedyvig  # noqa: F401  (registers greedyvig_s/m/b with timm)
from attvig_pyg.models.dense import AttentionViGFPN, SemanticFPN, attentionvig_fpn_backbone
from attvig_pyg.models.vig import ViG

__all__ = ["AttentionViG", "AttentionViGFPN", "SemanticFPN", "ViG", "attentionvig_fpn_backbone"]
